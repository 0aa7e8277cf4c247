// The emulator build of cuda/dilated_conv2d.cu: the same source, compiled by the host compiler with
// CONVOPS_EMULATE_CUDA, registering torch.ops.convops_emu.dilated_conv2d* on CPU tensors.
#include "cuda/dilated_conv2d.cu"
