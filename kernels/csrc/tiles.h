// The per-tile steps of the CPU attention kernel (attention.cpp): scores of query rows
// against a tile of keys, the online-softmax update of each row, and the weighted sum of
// the tile's values. Keys and values come as one row pointer per key, in their storage
// dtype E (converted in registers) or as float32 scratch rows; dims are padded to VL.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "simd.h"

namespace tk {

constexpr int kTileKeys = 64;  // keys per tile: a tile's K and V (32 KiB in bf16) stay cached
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// One chunk of VL dims into the RB x KB accumulators; the first chunk sets them (zeroing
// them first costs a memset call, the array being addressable).
template <int RB, int KB, class E, bool First>
__attribute__((always_inline)) inline void score_chunk(const float* q, int64_t qs,
                                                       const void* const* k, int c, V* acc) {
  using T = typename E::T;
  V qv[RB];
  for (int i = 0; i < RB; i++) {
    qv[i] = load(q + i * qs + c * VL);
    pin(qv[i]);
  }
  for (int j = 0; j < KB; j++) {
    V kv = E::load(static_cast<const T*>(k[j]) + c * VL);
    for (int i = 0; i < RB; i++) {
      acc[i * KB + j] = First ? qv[i] * kv : acc[i * KB + j] + qv[i] * kv;
    }
  }
}

// s[i][j] = q_i . k_j for RB rows and KB keys (RB * KB == VL accumulators, summed by one
// transposing tree), over nc >= 1 chunks of VL dims.
template <int RB, int KB, class E>
inline void score_tile(const float* q, int64_t qs, const void* const* k, int nc, float* s,
                       int64_t ss) {
  static_assert(RB * KB == VL, "one accumulator per lane of the result");
  V acc[VL];
  score_chunk<RB, KB, E, true>(q, qs, k, 0, acc);
  for (int c = 1; c < nc; c++) score_chunk<RB, KB, E, false>(q, qs, k, c, acc);
  float sums[VL];
  store(sums, sum_lanes(acc));
  for (int i = 0; i < RB; i++) std::memcpy(s + i * ss, sums + i * KB, KB * sizeof(float));
}

// Rows of the next tile to bring into L2 while this one computes, spread over the key
// blocks of the score pass so the loads overlap the arithmetic instead of stalling it.
// Hardware prefetchers stop at each 4 KiB page; without this a thread ran at half the
// memory bandwidth. Into L1 instead, the next tile evicted the current one.
// (Inlined by force: GCC takes a function of prefetches alone for one without effects,
// and drops its calls.)
struct Prefetch {
  const void* const* k = nullptr;
  const void* const* v = nullptr;
  int n = 0;
  int64_t row_bytes = 0;
  __attribute__((always_inline)) void rows(int lo, int hi) const {
    for (int j = lo; j < hi && j < n; j++) {
      for (int64_t off = 0; off < row_bytes; off += 64) {
        __builtin_prefetch(static_cast<const char*>(k[j]) + off, 0, 2);
        __builtin_prefetch(static_cast<const char*>(v[j]) + off, 0, 2);
      }
    }
  }
};

template <int RB, class E>
inline void scores(const float* q, int64_t qs, const void* const* k, int n, int nc, float* s,
                   int64_t ss, const Prefetch* next) {
  constexpr int KB = VL / RB;
  // The next tile's rows, n_next / blocks per key block (both at most kTileKeys).
  int blocks = (n + KB - 1) / KB, per = next ? (next->n + blocks - 1) / blocks : 0;
  for (int j = 0, b = 0; j < n; j += KB, b++) {
    if (next) next->rows(b * per, (b + 1) * per);
    score_tile<RB, KB, E>(q, qs, k + j, nc, s + j, ss);
  }
}

// acc_i += sum_j p[i][j] v_j for RB rows, CB chunks of VL dims at a time.
template <int RB, int CB, class E>
inline void pv_chunks(const float* p, int64_t ps, int n, const void* const* v, int c,
                      float* acc, int64_t as) {
  using T = typename E::T;
  V a[RB][CB];
  for (int i = 0; i < RB; i++)
    for (int b = 0; b < CB; b++) a[i][b] = load(acc + i * as + (c + b) * VL);
  for (int j = 0; j < n; j++) {
    const T* vj = static_cast<const T*>(v[j]) + c * VL;
    V vv[CB];
    for (int b = 0; b < CB; b++) vv[b] = E::load(vj + b * VL);
    for (int i = 0; i < RB; i++) {
      V w = splat(p[i * ps + j]);
      for (int b = 0; b < CB; b++) a[i][b] += w * vv[b];
    }
  }
  for (int i = 0; i < RB; i++)
    for (int b = 0; b < CB; b++) store(acc + i * as + (c + b) * VL, a[i][b]);
}

template <int RB, class E>
inline void pv(const float* p, int64_t ps, int n, const void* const* v, int nc, float* acc,
               int64_t as) {
  // Accumulators for RB rows x CB chunks, plus CB values and a weight, fit the registers.
  constexpr int CB = VL == 16 || RB < 4 ? 4 : 2;
  int c = 0;
  for (; c + CB <= nc; c += CB) pv_chunks<RB, CB, E>(p, ps, n, v, c, acc, as);
  for (; c < nc; c++) pv_chunks<RB, 1, E>(p, ps, n, v, c, acc, as);
}

// Rows in blocks of 4, 2, 1 (as many accumulators as registers allow).
template <class E>
void scores_rows(const float* q, int64_t rows, int64_t dp, const void* const* k, int n,
                 float* s, const Prefetch* next) {
  int nc = static_cast<int>(dp / VL);
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4, next = nullptr)
    scores<4, E>(q + r * dp, dp, k, n, nc, s + r * kTileKeys, kTileKeys, next);
  for (; r + 2 <= rows; r += 2, next = nullptr)
    scores<2, E>(q + r * dp, dp, k, n, nc, s + r * kTileKeys, kTileKeys, next);
  for (; r < rows; r++, next = nullptr)
    scores<1, E>(q + r * dp, dp, k, n, nc, s + r * kTileKeys, kTileKeys, next);
}

template <class E>
void pv_rows(const float* p, int64_t rows, int64_t dp, const void* const* v, int n, float* acc) {
  int nc = static_cast<int>(dp / VL);
  int64_t r = 0;
  const int64_t ps = kTileKeys;
  for (; r + 4 <= rows; r += 4) pv<4, E>(p + r * ps, ps, n, v, nc, acc + r * dp, dp);
  for (; r + 2 <= rows; r += 2) pv<2, E>(p + r * ps, ps, n, v, nc, acc + r * dp, dp);
  for (; r < rows; r++) pv<1, E>(p + r * ps, ps, n, v, nc, acc + r * dp, dp);
}

// n rows of dim elements to float32 rows of dp (zero padded), one per key.
template <class E>
void convert_rows(const void* const* src, int n, int64_t dim, int64_t dp, float* dst) {
  using T = typename E::T;
  int64_t full = dim / VL * VL;
  for (int j = 0; j < n; j++) {
    const T* s = static_cast<const T*>(src[j]);
    float* d = dst + j * dp;
    for (int64_t c = 0; c < full; c += VL) store(d + c, E::load(s + c));
    if (full < dp) {
      T tail[VL] = {};
      std::memcpy(tail, s + full, (dim - full) * sizeof(T));
      store(d + full, E::load(tail));
    }
  }
}

// Softmax update of one row over a tile whose scores are s[0, n); keys past `visible`
// are masked. Leaves the tile's weights in s and rescales the row's output.
inline void softmax_row(float* s, int n, int64_t visible, float* m, float* l, float* acc,
                        int64_t dp) {
  int nv = (n + VL - 1) / VL;
  if (visible <= 0) {
    for (int c = 0; c < nv; c++) store(s + c * VL, V{});
    return;
  }
  for (int64_t j = visible < n ? visible : n; j < nv * VL; j++) s[j] = kNegInf;
  V mx = splat(kNegInf);
  for (int c = 0; c < nv; c++) mx = vmax(mx, load(s + c * VL));
  float top = hmax(mx);
  float m_new = top > *m ? top : *m;
  V sum = V{};
  for (int c = 0; c < nv; c++) {
    V p = vexp(load(s + c * VL) - m_new);
    store(s + c * VL, p);
    sum += p;
  }
  if (m_new > *m) {
    float alpha = std::exp(*m - m_new);  // 0 while the row has seen nothing
    *l *= alpha;
    V va = splat(alpha);
    for (int64_t c = 0; c < dp; c += VL) store(acc + c, load(acc + c) * va);
    *m = m_new;
  }
  *l += hsum(sum);
}

}  // namespace tk
