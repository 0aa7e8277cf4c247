// The emulator build of cuda/deform_conv2d.cu: the same source, compiled by the host compiler with
// CONVOPS_EMULATE_CUDA, registering torch.ops.convops_emu.deform_conv2d* on CPU tensors.
#include "cuda/deform_conv2d.cu"
