// The GEMM steps of the "gather, then multiply" engines, one per group, shared by the CPU
// engine (cpu/gather_engine.h) and the CUDA engine (cuda/gather_engine.cuh); the engines differ
// only in how they build and scatter the columns, and in the matrix product they pass in:
//   mm(out, a, b, bias, accumulate):  out (+)= a @ b (+ bias as a column), out may be a view.
// AtenMatmul is BLAS/cuBLAS; the CUDA engine passes its own kernel in deterministic mode.
//   cols  (C * K, P)   the gathered chunk; rows of group grp at grp * Cg * K
//   w     (OC, Cg * K) the weight in the accumulation type
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>

#include "common/deform.h"

namespace convops {

struct AtenMatmul {
  void operator()(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                  const at::Tensor& bias, bool accumulate) const {
    if (accumulate) {
      const_cast<at::Tensor&>(out).addmm_(a, b);
    } else if (bias.defined()) {
      const_cast<at::Tensor&>(out).copy_(at::addmm(bias, a, b));
    } else if (out.is_contiguous() && out.scalar_type() == a.scalar_type()) {
      at::Tensor o = out;
      at::mm_out(o, a, b);
    } else {
      const_cast<at::Tensor&>(out).copy_(at::mm(a, b));
    }
  }
};

// out_n[:, p0 : p0 + P] = w[grp] @ cols[grp] (+ b[grp]) for every group; out_n is (OC, Ho * Wo).
template <typename Matmul>
void grouped_forward_gemm(const Matmul& mm, const at::Tensor& w, const at::Tensor& b,
                          const at::Tensor& cols, const DeformGeometry& g,
                          const at::Tensor& out_n, int64_t p0, int64_t P) {
  const int64_t CgK = g.channels_per_group() * g.taps(), OCg = g.out_channels_per_group();
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    mm(out_n.narrow(0, grp * OCg, OCg).narrow(1, p0, P), w.narrow(0, grp * OCg, OCg),
       cols.narrow(0, grp * CgK, CgK), b.defined() ? b.narrow(0, grp * OCg, OCg) : at::Tensor(),
       false);
  }
}

// gw[grp] += go_chunk[grp] @ cols[grp]^T for every group; gw is (OC, Cg * K).
template <typename Matmul>
void grouped_weight_grad_gemm(const Matmul& mm, at::Tensor& gw, const at::Tensor& go_chunk,
                              const at::Tensor& cols, const DeformGeometry& g) {
  const int64_t CgK = g.channels_per_group() * g.taps(), OCg = g.out_channels_per_group();
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    mm(gw.narrow(0, grp * OCg, OCg), go_chunk.narrow(0, grp * OCg, OCg),
       cols.narrow(0, grp * CgK, CgK).t(), at::Tensor(), true);
  }
}

// dcols[grp] = w[grp]^T @ go_chunk[grp] for every group (dcols is written in place).
template <typename Matmul>
void grouped_column_grad_gemm(const Matmul& mm, const at::Tensor& dcols, const at::Tensor& w,
                              const at::Tensor& go_chunk, const DeformGeometry& g) {
  const int64_t CgK = g.channels_per_group() * g.taps(), OCg = g.out_channels_per_group();
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    mm(dcols.narrow(0, grp * CgK, CgK), w.narrow(0, grp * OCg, OCg).t(),
       go_chunk.narrow(0, grp * OCg, OCg), at::Tensor(), false);
  }
}

}  // namespace convops
