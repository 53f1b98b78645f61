// Decode attention computed on compressed KV codes (tierd_kernels.codecs records), one
// encoded layer record per block: every query row sees every key.
//
// Entry point tk_attend_codes(const TkCodesArgs*). The math is codes_attention.py's:
//   kivi   q.K[t] = q.z[g] + (q * s[g]).c[t]: the per-channel key scales fold into q once
//          per token group g (in span order, see codes_tiles.h), the zero-point term is one
//          dot product per group and row; p.V[d] = sum_t (p_t sv[t, e]) cv[t, d] +
//          sum_t p_t zv[t, e]: the per-token value scales fold into p, the zero-point sums
//          are kept per row and value group beside the output and rescaled with it.
//   int8, fp8
//          q.K[t] = s_k[t] (q.c[t]) and p.V = sum_t (p_t s_v[t]) cv[t].
// Online softmax in float32 over tiles of 64 keys, as attention.cpp does. Work is split
// over (KV head, query tile, block range); a head's block ranges, when split, merge
// exactly by max and sum.
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <system_error>
#include <vector>

#include "codes_tiles.h"
#include "pool.h"
#include "simd.h"
#include "tiles.h"

extern "C" {
// Mirrored field for field by _TkCodesArgs in kernels/_native.py.
struct TkCodesArgs {
  const uint8_t* const* records;  // per block: the layer's encoded record
  int64_t n_blocks, block_tokens, last_tokens;  // the last block holds last_tokens keys
  int64_t kv_heads, dim;
  int64_t k_group, v_group;  // kivi: tokens per key group, channels per value group
  const float* q;            // [q_tokens, heads, dim] float32, contiguous, already scaled
  int64_t q_tokens, heads;
  float* out;  // [q_tokens, heads, dim] float32
  float* lse;  // [q_tokens, heads] float32
  int32_t codec, threads;
};
}

namespace tk {
namespace {

enum Codec : int32_t { kInt8 = 0, kFp8 = 1, kKivi4 = 2, kKivi2 = 3 };

constexpr int kRowTile = 64;              // query rows per task at most
constexpr int64_t kMinSplitKeys = 512;    // a task's block range is never shorter (unless all)
constexpr double kInlineWork = 1 << 20;   // multiply-adds below which no helper is woken

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Where things lie in a record, and the span-order tables of a call.
struct Geometry {
  int64_t heads, tokens, dim, kg = 1, vg = 1, groups_k = 1, groups_v = 1;
  int bits = 8, per = 1;
  int64_t row_bytes;   // code bytes per token
  int64_t spans;       // kivi: spans per token; per token codecs: dim rounded up to VL / VL
  int64_t dp;          // floats per row of q and of the output accumulators
  int64_t zp = 0;      // kivi: zero-point sums after them, rounded up to VL
  bool direct;         // code rows are read in place (else copied into padded rows)
  int64_t pad_bytes;   // bytes of a padded code row
  int64_t k_codes = 0, v_codes, k_scale = 0, k_zero = 0, v_scale = 0, v_zero = 0;
  std::vector<int32_t> pos_dim, dim_pos;  // span order <-> dim (-1: padding)
  int scale_mode = kSplat;                // how value scales fold in (codes_tiles.h)
  std::vector<int32_t> esc;               // kSplat: the value group of each span
  bool permutable = true;                 // a chunk's scales come from one permute
  std::vector<int32_t> chunk_base;        // per chunk: its first lane's value group
  std::vector<VI> chunk_idx;              // per chunk: lane -> group - base
  VI span_idx[4], span_from[16];          // to_span_order's tables
};

struct Task {
  int64_t head, t0, t1;  // KV head, query tokens [t0, t1)
  int64_t b0, b1;        // blocks
  int64_t slot;          // partial results at this row offset, or -1: write the output
};

struct Plan {
  const TkCodesArgs* a;
  Geometry g;
  int64_t group;
  std::vector<Task> tasks;
  std::vector<float> partials;  // per split task: rows x (max, sum, dim floats)
  std::atomic<int> failed{0};
};

struct Scratch {
  std::vector<float> qn, qp, qs, qz, s, acc, m, l, kf, kperm, sv, zv, pw, tmp;
  std::vector<V> svx;
  std::vector<uint8_t> kpad, vpad;
  std::vector<const uint8_t*> kp, vp;
  template <class T>
  static T* grow(std::vector<T>& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) v.resize(n);
    return v.data();
  }
};

thread_local Scratch scratch;

// The key and value code rows of one tile, in place or copied into zero-padded rows when a
// row is not a whole number of vectors (reading past it could leave the record).
struct Rows {
  const Geometry& g;
  const uint8_t** kp;
  const uint8_t** vp;
  uint8_t *kpad, *vpad;
  void take(const uint8_t* base, int64_t from, int n, const uint8_t** out,
            uint8_t* pad) const {
    for (int j = 0; j < n; j++) {
      const uint8_t* row = base + (from + j) * g.row_bytes;
      if (g.direct) {
        out[j] = row;
      } else {
        uint8_t* dst = pad + j * g.pad_bytes;
        std::memcpy(dst, row, g.row_bytes);
        std::memset(dst + g.row_bytes, 0, g.pad_bytes - g.row_bytes);
        out[j] = dst;
      }
    }
    // Whole key blocks past n: repeat the last row (its scores are ignored).
    for (int j = n; j < round_up(n, VL); j++) out[j] = out[n - 1];
  }
};

// Row r of a task: out (normalised) and lse, or its partial when the head is split.
void finish_row(Plan& plan, const Task& t, int64_t r, float m, float l, const float* nat) {
  const TkCodesArgs& a = *plan.a;
  const int64_t dim = a.dim;
  if (t.slot >= 0) {
    float* part = plan.partials.data() + (t.slot + r) * (dim + 2);
    part[0] = m;
    part[1] = l;
    std::memcpy(part + 2, nat, dim * sizeof(float));
    return;
  }
  int64_t token = t.t0 + r / plan.group, head = t.head * plan.group + r % plan.group;
  float* out = a.out + (token * a.heads + head) * dim;
  float inv = 1.0f / l;  // every task sees at least one key, so l > 0
  for (int64_t d = 0; d < dim; d++) out[d] = nat[d] * inv;
  a.lse[token * a.heads + head] = m + static_cast<float>(std::log(double(l)));
}

// A task's q rows: natural order in qn (dims padded to nat), and in row order of the
// accumulators in qp (span order for kivi).
void load_queries(const Plan& plan, const Task& t, int64_t rows, int64_t nat, float* qn,
                  float* qp) {
  const TkCodesArgs& a = *plan.a;
  const Geometry& g = plan.g;
  for (int64_t r = 0; r < rows; r++) {
    int64_t token = t.t0 + r / plan.group, head = t.head * plan.group + r % plan.group;
    const float* src = a.q + (token * a.heads + head) * a.dim;
    std::memcpy(qn + r * nat, src, a.dim * sizeof(float));
    std::memset(qn + r * nat + a.dim, 0, (nat - a.dim) * sizeof(float));
    if (qp == nullptr) continue;
    for (int64_t p = 0; p < g.dp; p++) {
      int32_t d = g.pos_dim[p];
      qp[r * g.dp + p] = d >= 0 ? src[d] : 0.0f;
    }
  }
}

int64_t block_keys(const TkCodesArgs& a, int64_t b) {
  return b == a.n_blocks - 1 ? a.last_tokens : a.block_tokens;
}

// int8 and fp8: codes [2, H, T, D] one byte each, then float32 scales [2, H, T].
template <class E>
void token_task(Plan& plan, const Task& t) {
  const TkCodesArgs& a = *plan.a;
  const Geometry& g = plan.g;
  const int64_t rows = (t.t1 - t.t0) * plan.group, dp = g.dp, T = g.tokens;
  Scratch& sc = scratch;
  float* q = Scratch::grow(sc.qn, rows * dp);
  float* s = Scratch::grow(sc.s, rows * kTileKeys);
  float* acc = Scratch::grow(sc.acc, rows * dp);
  float* m = Scratch::grow(sc.m, rows);
  float* l = Scratch::grow(sc.l, rows);
  float* scales = Scratch::grow(sc.tmp, 2 * kTileKeys);
  Rows rw{g, Scratch::grow(sc.kp, 2 * (kTileKeys + VL)), nullptr,
          Scratch::grow(sc.kpad, kTileKeys * g.pad_bytes),
          Scratch::grow(sc.vpad, kTileKeys * g.pad_bytes)};
  rw.vp = rw.kp + kTileKeys + VL;
  load_queries(plan, t, rows, dp, q, nullptr);
  // Fp8Codes reads codes as value * 2^-8: 2^8 goes into q and the value scales (exact).
  const float unit = a.codec == kFp8 ? 256.0f : 1.0f;
  if (unit != 1.0f)
    for (int64_t i = 0; i < rows * dp; i++) q[i] *= unit;
  std::memset(acc, 0, rows * dp * sizeof(float));
  for (int64_t r = 0; r < rows; r++) {
    m[r] = kNegInf;
    l[r] = 0.0f;
  }
  for (int64_t b = t.b0; b < t.b1; b++) {
    const uint8_t* rec = a.records[b];
    const uint8_t* kc = rec + g.k_codes + t.head * T * g.row_bytes;
    const uint8_t* vc = rec + g.v_codes + t.head * T * g.row_bytes;
    const uint8_t* ks = rec + g.k_scale + t.head * T * 4;
    const uint8_t* vs = rec + g.v_scale + t.head * T * 4;
    const int64_t keys = block_keys(a, b);
    for (int64_t j0 = 0; j0 < keys; j0 += kTileKeys) {
      int n = static_cast<int>(keys - j0 < kTileKeys ? keys - j0 : kTileKeys);
      rw.take(kc, j0, n, rw.kp, rw.kpad);
      rw.take(vc, j0, n, rw.vp, rw.vpad);
      std::memcpy(scales, ks + j0 * 4, n * 4);  // float32, possibly unaligned
      std::memcpy(scales + kTileKeys, vs + j0 * 4, n * 4);
      // The next tile's rows into L2 while this one computes.
      int64_t nj = j0 + kTileKeys < keys ? j0 + kTileKeys : 0;
      int64_t nb = nj > 0 ? b : b + 1;
      Prefetch next;
      const void* npk[kTileKeys];
      const void* npv[kTileKeys];
      if (g.direct && nb < t.b1) {
        const uint8_t* nrec = a.records[nb];
        int64_t nkeys = block_keys(a, nb) - nj;
        next.n = static_cast<int>(nkeys < kTileKeys ? nkeys : kTileKeys);
        for (int j = 0; j < next.n; j++) {
          npk[j] = nrec + g.k_codes + (t.head * T + nj + j) * g.row_bytes;
          npv[j] = nrec + g.v_codes + (t.head * T + nj + j) * g.row_bytes;
        }
        next.k = npk;
        next.v = npv;
        next.row_bytes = g.row_bytes;
      }
      const void* const* kp = reinterpret_cast<const void* const*>(rw.kp);
      const void* const* vp = reinterpret_cast<const void* const*>(rw.vp);
      scores_rows<E>(q, rows, dp, kp, n, s, &next);
      for (int64_t r = 0; r < rows; r++) {
        float* sr = s + r * kTileKeys;
        for (int j = 0; j < n; j++) sr[j] *= scales[j];
        softmax_row(sr, n, n, m + r, l + r, acc + r * dp, dp);
        for (int j = 0; j < n; j++) sr[j] *= scales[kTileKeys + j] * unit;
      }
      pv_rows<E>(s, rows, dp, vp, n, acc);
    }
  }
  for (int64_t r = 0; r < rows; r++) finish_row(plan, t, r, m[r], l[r], acc + r * dp);
}

// The next tile of a kivi task: its key and value codes and value parameters.
void next_kivi_lines(const Plan& plan, const Task& t, int64_t b, int64_t j0, Lines& lines) {
  const TkCodesArgs& a = *plan.a;
  const Geometry& g = plan.g;
  int64_t nj = j0 + kTileKeys, nb = b;
  if (nj >= block_keys(a, b)) {
    nj = 0;
    nb = b + 1;
  }
  if (nb >= t.b1) return;
  int64_t n = block_keys(a, nb) - nj;
  n = n < kTileKeys ? n : kTileKeys;
  const uint8_t* rec = a.records[nb];
  int64_t tok = t.head * g.tokens + nj;
  lines.add(rec + g.k_codes + tok * g.row_bytes, n * g.row_bytes);
  lines.add(rec + g.v_codes + tok * g.row_bytes, n * g.row_bytes);
  lines.add(rec + g.v_scale + tok * g.groups_v * 2, n * g.groups_v * 2);
  lines.add(rec + g.v_zero + tok * g.groups_v * 2, n * g.groups_v * 2);
}

template <int BITS>
void kivi_task(Plan& plan, const Task& t) {
  constexpr int PER = 8 / BITS;
  const TkCodesArgs& a = *plan.a;
  const Geometry& g = plan.g;
  const int64_t rows = (t.t1 - t.t0) * plan.group, dp = g.dp, ap = dp + g.zp;
  const int64_t dim = g.dim, nat = round_up(dim, VL), T = g.tokens, kg = g.kg;
  const int64_t ngv = g.groups_v, chunks = g.spans * PER;
  const int spans = static_cast<int>(g.spans);
  constexpr int64_t SS = kScoreStride;
  Scratch& sc = scratch;
  float* qn = Scratch::grow(sc.qn, rows * nat);
  float* qp = Scratch::grow(sc.qp, rows * dp);
  float* qs = Scratch::grow(sc.qs, rows * dp);
  float* qz = Scratch::grow(sc.qz, rows);
  float* s = Scratch::grow(sc.s, rows * SS);
  float* acc = Scratch::grow(sc.acc, rows * ap);
  float* m = Scratch::grow(sc.m, rows);
  float* l = Scratch::grow(sc.l, rows);
  float* kf = Scratch::grow(sc.kf, dp + nat);         // a group's key scales, zeros
  float* kperm = Scratch::grow(sc.kperm, dp);          // its scales in span order
  const bool splat_w = g.scale_mode == kSplat;  // weights fold the scales in
  // A tile's value scales and zero points, token-major; VL floats of slack past the end
  // for the permuted loads of the last token's chunks.
  float* sv = Scratch::grow(sc.sv, round_up(kTileKeys * ngv, VL) + VL);
  float* zv = Scratch::grow(sc.zv, round_up(kTileKeys * ngv, VL) + VL);
  // Splat weights: [row][token] with one group, else [row][token][group (gs of them)].
  const int64_t gs = round_up(ngv, VL);
  float* pw = splat_w ? Scratch::grow(sc.pw, rows * (ngv == 1 ? SS : kTileKeys * gs)) : nullptr;
  const int64_t units = g.scale_mode == kSpans ? g.spans : chunks;  // svx per token
  V* svx = splat_w ? nullptr : Scratch::grow(sc.svx, kTileKeys * units);
  float* nat_out = Scratch::grow(sc.tmp, nat);
  Rows rw{g, Scratch::grow(sc.kp, 2 * (kTileKeys + VL)), nullptr,
          Scratch::grow(sc.kpad, (kTileKeys + VL) * g.pad_bytes),
          Scratch::grow(sc.vpad, (kTileKeys + VL) * g.pad_bytes)};
  rw.vp = rw.kp + kTileKeys + VL;

  load_queries(plan, t, rows, nat, qn, qp);
  std::memset(acc, 0, rows * ap * sizeof(float));
  std::memset(kf, 0, dp * sizeof(float));  // scales past dim stay 0 (their q is 0 too)
  for (int64_t r = 0; r < rows; r++) {
    m[r] = kNegInf;
    l[r] = 0.0f;
  }
  for (int64_t b = t.b0; b < t.b1; b++) {
    const uint8_t* rec = a.records[b];
    const int64_t h = t.head, keys = block_keys(a, b);
    const uint8_t* kc = rec + g.k_codes + h * T * g.row_bytes;
    const uint8_t* vc = rec + g.v_codes + h * T * g.row_bytes;
    const uint8_t* ks = rec + g.k_scale + h * g.groups_k * dim * 2;
    const uint8_t* kz = rec + g.k_zero + h * g.groups_k * dim * 2;
    const uint8_t* vs = rec + g.v_scale + h * T * ngv * 2;
    const uint8_t* vz = rec + g.v_zero + h * T * ngv * 2;
    int64_t group_now = -1;
    for (int64_t j0 = 0; j0 < keys; j0 += kTileKeys) {
      const int n = static_cast<int>(keys - j0 < kTileKeys ? keys - j0 : kTileKeys);
      Lines next;
      next_kivi_lines(plan, t, b, j0, next);
      const int kb = rows >= 4 ? VL / 4 : (rows >= 2 ? VL / 2 : VL);
      next.per_step = static_cast<int>((next.total_lines() * kb + n - 1) / n);
      // Scores, one key group piece at a time: its scales fold into q, its zero points
      // give one dot product per row.
      for (int jj = 0; jj < n;) {
        const int64_t tok = j0 + jj, grp = tok / kg;
        const int len = static_cast<int>((grp + 1) * kg - tok < n - jj ? (grp + 1) * kg - tok
                                                                       : n - jj);
        if (grp != group_now) {
          group_now = grp;
          halves_to_float(ks + grp * dim * 2, dim, kf);
          halves_to_float(kz + grp * dim * 2, dim, kf + dp);
          to_span_order<BITS>(kf, g.spans, g.span_idx, g.span_from, kperm);
          for (int64_t r = 0; r < rows; r++) {
            for (int64_t p = 0; p < dp; p += VL)
              store(qs + r * dp + p, load(qp + r * dp + p) * load(kperm + p));
            V z = V{};
            for (int64_t d = 0; d < nat; d += VL) z += load(qn + r * nat + d) * load(kf + dp + d);
            qz[r] = hsum(z);
          }
        }
        rw.take(kc, tok, len, rw.kp + jj, rw.kpad + jj * g.pad_bytes);
        code_scores_rows<BITS>(qs, rows, dp, rw.kp + jj, len, s + jj, SS, &next);
        for (int64_t r = 0; r < rows; r++)
          for (int x = 0; x < len; x++) s[r * SS + jj + x] += qz[r];
        jj += len;
      }
      next.rest();
      for (int64_t r = 0; r < rows; r++) softmax_row(s + r * SS, n, n, m + r, l + r, acc + r * ap, ap);
      // Values: the tile's scales and zero points to float32, token-major. The zero-point
      // sums and the splat weights go by token over a vector of groups, or, with one
      // group, by group over a vector of tokens.
      halves_to_float(vs + j0 * ngv * 2, n * ngv, sv);
      halves_to_float(vz + j0 * ngv * 2, n * ngv, zv);
      const int nv = static_cast<int>(round_up(n, VL));  // p is 0 in [n, nv), so are sv, zv
      for (int64_t r = 0; r < rows; r++) {
        const float* p = s + r * SS;
        float* zsum = acc + r * ap + dp;
        if (ngv == 1) {
          V z = V{};
          for (int j = 0; j < nv; j += VL) z += load(p + j) * load(zv + j);
          zsum[0] += hsum(z);
          if (splat_w)
            for (int j = 0; j < nv; j += VL) store(pw + r * SS + j, load(p + j) * load(sv + j));
          continue;
        }
        for (int64_t ev = 0; ev < ngv; ev += VL) {
          // Four chains: one would wait out an add's latency per token.
          V z[4] = {load(zsum + ev), V{}, V{}, V{}};
          for (int j = 0; j < n; j++) {
            V pj = splat(p[j]);
            z[j & 3] += pj * load(zv + j * ngv + ev);  // lanes past ngv: padding, never read
            if (splat_w) store(pw + (r * kTileKeys + j) * gs + ev, pj * load(sv + j * ngv + ev));
          }
          store(zsum + ev, (z[0] + z[1]) + (z[2] + z[3]));
        }
      }
      rw.take(vc, j0, n, rw.vp, rw.vpad);
      PvIn in{};
      in.v = rw.vp;
      in.n = n;
      if (splat_w) {
        in.w = pw;
        in.ws = ngv == 1 ? SS : kTileKeys * gs;
        in.es = 1;
        in.js = ngv == 1 ? 1 : gs;
        in.esc = g.esc.data();
        code_pv_rows<BITS, kSplat>(in, rows, spans, acc, ap);
        continue;
      }
      // Token j's scales spread over the lanes of each span (or chunk).
      const int64_t step = g.scale_mode == kSpans ? PER : 1;
      for (int j = 0; j < n; j++) {
        const float* row = sv + j * ngv;
        for (int64_t u = 0; u < units; u++) {
          const int64_t c = u * step;
          if (g.permutable) {
            svx[j * units + u] = permute(load(row + g.chunk_base[c]), g.chunk_idx[c]);
          } else {
            float lanes[VL];
            int32_t idx[VL];
            std::memcpy(idx, &g.chunk_idx[c], sizeof idx);
            for (int i = 0; i < VL; i++) lanes[i] = row[idx[i]];
            svx[j * units + u] = load(lanes);
          }
        }
      }
      in.w = s;
      in.ws = SS;
      in.svx = svx;
      in.xs = units;
      if (g.scale_mode == kSpans) {
        code_pv_rows<BITS, kSpans>(in, rows, spans, acc, ap);
      } else {
        code_pv_rows<BITS, kChunks>(in, rows, spans, acc, ap);
      }
    }
  }
  for (int64_t r = 0; r < rows; r++) {
    const float* row = acc + r * ap;
    for (int64_t d = 0; d < dim; d++) nat_out[d] = row[g.dim_pos[d]] + row[dp + d / g.vg];
    finish_row(plan, t, r, m[r], l[r], nat_out);
  }
}

void run_one(void* ctx, int64_t i) {
  Plan& plan = *static_cast<Plan*>(ctx);
  try {
    switch (plan.a->codec) {
      case kInt8: token_task<I8>(plan, plan.tasks[i]); break;
      case kFp8: token_task<Fp8Codes>(plan, plan.tasks[i]); break;
      case kKivi4: kivi_task<4>(plan, plan.tasks[i]); break;
      case kKivi2: kivi_task<2>(plan, plan.tasks[i]); break;
      default: plan.failed.store(1);
    }
  } catch (const std::bad_alloc&) {
    plan.failed.store(2);
  }
}

// The split block ranges of rows [t0, t1) of one head, merged exactly into the output.
void merge_splits(Plan& plan, const Task* first, int64_t splits) {
  const TkCodesArgs& a = *plan.a;
  const int64_t dim = a.dim, rows = (first->t1 - first->t0) * plan.group;
  for (int64_t r = 0; r < rows; r++) {
    float top = kNegInf;
    for (int64_t s = 0; s < splits; s++) {
      float ms = plan.partials[(first[s].slot + r) * (dim + 2)];
      top = ms > top ? ms : top;
    }
    int64_t token = first->t0 + r / plan.group, head = first->head * plan.group + r % plan.group;
    float* out = a.out + (token * a.heads + head) * dim;
    std::memset(out, 0, dim * sizeof(float));
    double total = 0.0;
    for (int64_t s = 0; s < splits; s++) {
      const float* part = plan.partials.data() + (first[s].slot + r) * (dim + 2);
      float w = std::exp(part[0] - top);
      total += double(w) * part[1];
      for (int64_t d = 0; d < dim; d++) out[d] += w * part[2 + d];
    }
    float inv = static_cast<float>(1.0 / total);
    for (int64_t d = 0; d < dim; d++) out[d] *= inv;
    a.lse[token * a.heads + head] = top + static_cast<float>(std::log(total));
  }
}

// Units are (KV head, query tile); a unit's blocks split into ranges when there are too
// few units to keep every thread busy.
int plan_tasks(Plan& plan, int threads, std::vector<int64_t>& unit_splits) {
  const TkCodesArgs& a = *plan.a;
  const int64_t tile = kRowTile / plan.group > 0 ? kRowTile / plan.group : 1;
  const int64_t qtiles = (a.q_tokens + tile - 1) / tile;
  const int64_t units = qtiles * a.kv_heads;
  const int64_t want = threads > 1 ? 4 * int64_t(threads) : 1;
  const int64_t min_blocks = (kMinSplitKeys + a.block_tokens - 1) / a.block_tokens;
  int64_t n = (want + units - 1) / units;
  n = n < a.n_blocks / min_blocks ? n : a.n_blocks / min_blocks;
  n = n > 1 ? n : 1;
  int64_t slots = 0;
  for (int64_t qt = 0; qt < qtiles; qt++) {
    int64_t t0 = qt * tile, t1 = t0 + tile < a.q_tokens ? t0 + tile : a.q_tokens;
    for (int64_t h = 0; h < a.kv_heads; h++) {
      unit_splits.push_back(n);
      for (int64_t s = 0; s < n; s++) {
        int64_t slot = n > 1 ? slots : -1;
        if (n > 1) slots += (t1 - t0) * plan.group;
        plan.tasks.push_back(Task{h, t0, t1, a.n_blocks * s / n, a.n_blocks * (s + 1) / n, slot});
      }
    }
  }
  plan.partials.resize(slots * (a.dim + 2));
  double keys = double(a.n_blocks - 1) * a.block_tokens + a.last_tokens;
  double work = keys * double(a.q_tokens) * a.heads * a.dim;
  return work < kInlineWork ? 0 : threads - 1;
}

// The record layout and the span-order tables; false when the arguments are inconsistent.
bool make_geometry(const TkCodesArgs& a, Geometry& g) {
  g.heads = a.kv_heads;
  g.tokens = a.block_tokens;
  g.dim = a.dim;
  const int64_t H = g.heads, T = g.tokens, D = g.dim;
  if (a.codec == kInt8 || a.codec == kFp8) {
    g.row_bytes = D;
    g.dp = round_up(D, VL);
    g.spans = g.dp / VL;
    g.direct = D % VL == 0;
    g.pad_bytes = g.dp;
    g.v_codes = H * T * D;
    g.k_scale = 2 * H * T * D;
    g.v_scale = g.k_scale + 4 * H * T;
    return true;
  }
  g.bits = a.codec == kKivi4 ? 4 : 2;
  g.per = 8 / g.bits;
  g.kg = a.k_group;
  g.vg = a.v_group;
  if (g.kg <= 0 || T % g.kg != 0 || g.vg <= 0 || D % g.vg != 0 || D % g.per != 0) return false;
  g.groups_k = T / g.kg;
  g.groups_v = D / g.vg;
  const int64_t per = g.per, S = VL * per;
  g.row_bytes = D / per;
  g.spans = (g.row_bytes + VL - 1) / VL;
  g.dp = g.spans * S;
  g.zp = round_up(g.groups_v, VL);
  g.direct = g.row_bytes % VL == 0;
  g.pad_bytes = g.spans * VL;
  g.v_codes = H * T * g.row_bytes;
  g.k_scale = 2 * H * T * g.row_bytes;
  g.k_zero = g.k_scale + 2 * H * g.groups_k * D;
  g.v_scale = g.k_zero + 2 * H * g.groups_k * D;
  g.v_zero = g.v_scale + 2 * H * T * g.groups_v;
  g.pos_dim.assign(g.dp, -1);
  g.dim_pos.assign(D, 0);
  for (int64_t sc = 0; sc < g.spans; sc++)
    for (int64_t k = 0; k < per; k++)
      for (int64_t i = 0; i < VL; i++) {
        int64_t pos = sc * S + k * VL + i, d = sc * S + per * i + k;
        if (d < D) {
          g.pos_dim[pos] = static_cast<int32_t>(d);
          g.dim_pos[d] = static_cast<int32_t>(pos);
        }
      }
  // Value groups by lane: padding lanes take the last real dim's group (their codes are 0).
  const int64_t chunks = g.spans * per;
  g.chunk_base.assign(chunks, 0);
  g.chunk_idx.assign(chunks, VI{});
  g.esc.assign(g.spans, 0);
  bool one_group = true, same_in_span = true;
  std::vector<int32_t> lanes(chunks * VL);
  for (int64_t c = 0; c < chunks; c++) {
    for (int64_t i = 0; i < VL; i++) {
      int32_t d = g.pos_dim[c * VL + i];
      lanes[c * VL + i] = static_cast<int32_t>((d >= 0 ? d : D - 1) / g.vg);
      if (c % per != 0 && lanes[c * VL + i] != lanes[(c - c % per) * VL + i]) same_in_span = false;
    }
    int32_t lo = lanes[c * VL], hi = lo;
    for (int64_t i = 0; i < VL; i++) {
      lo = lanes[c * VL + i] < lo ? lanes[c * VL + i] : lo;
      hi = lanes[c * VL + i] > hi ? lanes[c * VL + i] : hi;
    }
    if (lo != hi) one_group = false;
    if (hi - lo >= VL) g.permutable = false;
    if (c % per == 0) g.esc[c / per] = lo;
    g.chunk_base[c] = lo;
    // Permutable: indices relative to the base; else absolute groups (gathered one by one).
    VI idx;
    for (int64_t i = 0; i < VL; i++) idx[i] = lanes[c * VL + i] - lo;
    g.chunk_idx[c] = idx;
  }
  g.scale_mode = same_in_span ? (one_group ? kSplat : kSpans) : kChunks;
  for (int64_t k = 0; k < per; k++) {
    for (int64_t i = 0; i < VL; i++) {
      int64_t src = per * i + k;  // natural lane within the span
      g.span_idx[k][i] = static_cast<int32_t>(src % VL);
      for (int64_t s = 0; s < per; s++) g.span_from[k * per + s][i] = src / VL == s ? -1 : 0;
    }
  }
  if (!g.permutable) {
    for (int64_t c = 0; c < chunks; c++) {
      VI idx;
      for (int64_t i = 0; i < VL; i++) idx[i] = g.chunk_idx[c][i] + g.chunk_base[c];
      g.chunk_idx[c] = idx;
    }
  }
  return true;
}

}  // namespace
}  // namespace tk

extern "C" {

// Which codecs this build reads (bit i: codec code i).
__attribute__((visibility("default"))) int32_t tk_codes_codecs(void) { return 0xf; }

// 0 on success; 1: bad arguments, 2: out of memory.
__attribute__((visibility("default"))) int32_t tk_attend_codes(const TkCodesArgs* a) {
  using namespace tk;
  if (a->records == nullptr || a->n_blocks <= 0 || a->block_tokens <= 0 ||
      a->last_tokens < 1 || a->last_tokens > a->block_tokens || a->kv_heads <= 0 ||
      a->heads % a->kv_heads != 0 || a->heads <= 0 || a->dim <= 0 || a->q_tokens <= 0 ||
      a->codec < kInt8 || a->codec > kKivi2)
    return 1;
  for (int64_t b = 0; b < a->n_blocks; b++)
    if (a->records[b] == nullptr) return 1;
  try {
    Plan plan;
    plan.a = a;
    plan.group = a->heads / a->kv_heads;
    if (!make_geometry(*a, plan.g)) return 1;
    std::vector<int64_t> unit_splits;
    int threads = a->threads > 0 ? a->threads : 1;
    Job job;
    job.helpers = plan_tasks(plan, threads, unit_splits);
    job.fn = run_one;
    job.ctx = &plan;
    job.n = static_cast<int64_t>(plan.tasks.size());
    Pool::get().run(job);
    if (plan.failed.load()) return plan.failed.load();
    const Task* t = plan.tasks.data();
    for (int64_t n : unit_splits) {
      if (n > 1) merge_splits(plan, t, n);
      t += n;
    }
    return 0;
  } catch (const std::bad_alloc&) {
    return 2;
  } catch (const std::system_error&) {
    return 2;  // no thread could be started
  }
}

}  // extern "C"
