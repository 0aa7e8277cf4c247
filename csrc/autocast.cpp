// Autocast kernels: under torch.autocast the convops ops run natively in the autocast dtype
// (fp16/bf16), like aten's convolutions, instead of being upcast to fp32.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace convops {
namespace {

constexpr char kDepthwise[] = "convops::depthwise_conv2d";
constexpr char kDilated[] = "convops::dilated_conv2d";

// depthwise_conv2d and dilated_conv2d share a signature.
template <c10::DispatchKey key, c10::DeviceType device, const char* name>
at::Tensor conv_autocast(const at::Tensor& input, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  const auto dtype = at::autocast::get_autocast_dtype(device);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow(name, "")
                       .typed<decltype(conv_autocast<key, device, name>)>();
  return op.call(at::autocast::cached_cast(dtype, input, device),
                 at::autocast::cached_cast(dtype, weight, device),
                 at::autocast::cached_cast(dtype, bias, device), stride, padding, dilation);
}

template <c10::DispatchKey key, c10::DeviceType device>
at::Tensor deform_conv2d_autocast(const at::Tensor& input, const at::Tensor& weight,
                                  const at::Tensor& offset,
                                  const c10::optional<at::Tensor>& mask,
                                  const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  const auto dtype = at::autocast::get_autocast_dtype(device);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("convops::deform_conv2d", "")
                       .typed<decltype(deform_conv2d_autocast<key, device>)>();
  return op.call(at::autocast::cached_cast(dtype, input, device),
                 at::autocast::cached_cast(dtype, weight, device),
                 at::autocast::cached_cast(dtype, offset, device),
                 at::autocast::cached_cast(dtype, mask, device),
                 at::autocast::cached_cast(dtype, bias, device), stride, padding, dilation);
}

}  // namespace

#define CONVOPS_AUTOCAST_IMPLS(m, key, device)                                      \
  m.impl("depthwise_conv2d", &conv_autocast<key, device, kDepthwise>);             \
  m.impl("dilated_conv2d", &conv_autocast<key, device, kDilated>);                 \
  m.impl("deform_conv2d", &deform_conv2d_autocast<key, device>);

TORCH_LIBRARY_IMPL(convops, AutocastCPU, m) {
  CONVOPS_AUTOCAST_IMPLS(m, c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU)
}

TORCH_LIBRARY_IMPL(convops, AutocastCUDA, m) {
  CONVOPS_AUTOCAST_IMPLS(m, c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA)
}

}  // namespace convops
