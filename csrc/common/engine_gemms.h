// The GEMM steps of the "gather, then multiply" engines, one per group, written with ATen ops
// so that the CPU engine (cpu/gather_engine.h) and the CUDA engine (cuda/gather_engine.cuh)
// share them; the engines differ only in how they build and scatter the columns.
//   cols  (C * K, P)   the gathered chunk; rows of group grp at grp * Cg * K
//   w     (OC, Cg * K) the weight in the accumulation type
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>

#include "common/deform.h"

namespace convops {

// out_n[:, p0 : p0 + P] = w[grp] @ cols[grp] (+ b[grp]) for every group; out_n is (OC, Ho * Wo).
inline void grouped_forward_gemm(const at::Tensor& w, const at::Tensor& b, const at::Tensor& cols,
                                 const DeformGeometry& g, const at::Tensor& out_n, int64_t p0,
                                 int64_t P) {
  const int64_t CgK = g.channels_per_group() * g.taps(), OCg = g.out_channels_per_group();
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    const at::Tensor wg = w.narrow(0, grp * OCg, OCg);
    const at::Tensor cg = cols.narrow(0, grp * CgK, CgK);
    const at::Tensor res = b.defined() ? at::addmm(b.narrow(0, grp * OCg, OCg), wg, cg)
                                       : at::mm(wg, cg);
    out_n.narrow(0, grp * OCg, OCg).narrow(1, p0, P).copy_(res);
  }
}

// gw[grp] += go_chunk[grp] @ cols[grp]^T for every group; gw is (OC, Cg * K).
inline void grouped_weight_grad_gemm(at::Tensor& gw, const at::Tensor& go_chunk,
                                     const at::Tensor& cols, const DeformGeometry& g) {
  const int64_t CgK = g.channels_per_group() * g.taps(), OCg = g.out_channels_per_group();
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    gw.narrow(0, grp * OCg, OCg)
        .addmm_(go_chunk.narrow(0, grp * OCg, OCg), cols.narrow(0, grp * CgK, CgK).t());
  }
}

// dcols[grp] = w[grp]^T @ go_chunk[grp] for every group (dcols is written in place).
inline void grouped_column_grad_gemm(const at::Tensor& dcols, const at::Tensor& w,
                                     const at::Tensor& go_chunk, const DeformGeometry& g) {
  const int64_t CgK = g.channels_per_group() * g.taps(), OCg = g.out_channels_per_group();
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    at::Tensor dcols_g = dcols.narrow(0, grp * CgK, CgK);
    at::mm_out(dcols_g, w.narrow(0, grp * OCg, OCg).t(), go_chunk.narrow(0, grp * OCg, OCg));
  }
}

}  // namespace convops
