// Fused CPU attention over KV blocks in tierd's layout [layer][K|V][kv_head][token][dim].
//
// One entry point, tk_attend(const TkArgs*): every query row of one KV head (the query
// heads that share it, times the query tokens of a tile) goes over that head's keys once,
// a tile of keys at a time: scores for the tile, an online-softmax update per row (running
// max, sum and float32 output, rescaled when the max grows), then the tile's values. K and
// V are read where they lie, in their storage dtype (float32, float16, bfloat16, float8
// e4m3fn / e5m2), converted in registers; nothing is gathered. Work is split over (KV
// head, query tile, key range); a head's key ranges, when split, merge exactly by max and
// sum. Masking: query token i sits at position causal_offset + i and sees keys at or
// before it (no mask when `causal` is 0), as tierd_kernels.attend_blocks defines.
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <new>
#include <system_error>
#include <utility>
#include <vector>

#include "pool.h"
#include "simd.h"
#include "tiles.h"

namespace tk {

constexpr int kTileRows = 64;   // query rows per task at most (group * query tokens)
constexpr int kDirectRows = 8;  // up to this many rows read K and V in place, converting
                                // per use; more rows convert a tile once into scratch
constexpr int64_t kMinSplitKeys = 512;  // a task's key range is never shorter (unless all)
constexpr double kInlineWork = 1 << 20;  // multiply-adds below which no helper is woken

enum Dtype : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2, kE4M3 = 3, kE5M2 = 4 };

}  // namespace tk

extern "C" {
// Mirrored field for field by _TkArgs in kernels/_native.py.
struct TkArgs {
  const void* const* k;  // per block: the layer's K (kv head 0, token 0)
  const void* const* v;  // per block: the layer's V
  int64_t n_blocks, block_tokens, seq;  // seq: keys in all (the last block may be partial)
  int64_t head_stride, token_stride;    // in elements; the dim stride is 1
  int64_t kv_heads, dim;
  const float* q;  // [q_tokens, heads, dim] float32, contiguous, already scaled
  int64_t q_tokens, heads;
  int64_t causal_offset;
  float* out;  // [q_tokens, heads, dim] float32
  float* lse;  // [q_tokens, heads] float32
  int32_t dtype, causal, threads, reserved;
};
}

namespace tk {

namespace {

struct Task {
  int64_t head, t0, t1;  // KV head, query tokens [t0, t1)
  int64_t k_lo, k_hi;    // keys
  int64_t slot;          // partial results at this row offset, or -1: write the output
};

struct Plan {
  const TkArgs* a;
  int64_t group, dp;  // query heads per KV head; dim rounded up to VL
  std::vector<Task> tasks;
  std::vector<float> partials;  // per split task: rows x (max, sum, dp floats)
  std::atomic<int> failed{0};
};

struct Scratch {
  std::vector<float> q, s, acc, m, l, kt, vt;
  std::vector<const void*> kp, vp, nkp, nvp;
  void reserve(int64_t rows, int64_t dp, bool tiles) {
    grow(q, rows * dp);
    grow(acc, rows * dp);
    grow(s, rows * kTileKeys);
    grow(m, rows);
    grow(l, rows);
    if (tiles) {
      grow(kt, kTileKeys * dp);
      grow(vt, kTileKeys * dp);
    }
    if (kp.size() < kTileKeys + VL) {
      for (auto* p : {&kp, &vp, &nkp, &nvp}) p->resize(kTileKeys + VL);
    }
  }
  static void grow(std::vector<float>& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  }
};

thread_local Scratch scratch;

// Walks one KV head's keys from a position on, a tile of row pointers at a time.
struct Cursor {
  const TkArgs& a;
  int64_t head_off, pos, blk, in_blk;
  Cursor(const TkArgs& args, int64_t head, int64_t from)
      : a(args), head_off(head * args.head_stride), pos(from),
        blk(from / args.block_tokens), in_blk(from % args.block_tokens) {}

  template <class E>
  int take(int64_t end, const void** kp, const void** vp) {
    using T = typename E::T;
    int n = static_cast<int>(end - pos < kTileKeys ? end - pos : kTileKeys);
    for (int j = 0; j < n; j++) {
      int64_t off = head_off + in_blk * a.token_stride;
      kp[j] = static_cast<const T*>(a.k[blk]) + off;
      vp[j] = static_cast<const T*>(a.v[blk]) + off;
      if (++in_blk == a.block_tokens) {
        in_blk = 0;
        blk++;
      }
    }
    pos += n;
    return n > 0 ? n : 0;
  }
};

template <class E>
void run_task(Plan& plan, const Task& t) {
  const TkArgs& a = *plan.a;
  const int64_t group = plan.group, dp = plan.dp, dim = a.dim;
  const int64_t rows = (t.t1 - t.t0) * group;
  const bool direct = dim % VL == 0 && rows <= kDirectRows;
  Scratch& sc = scratch;
  sc.reserve(rows, dp, !direct);
  float *q = sc.q.data(), *acc = sc.acc.data(), *s = sc.s.data();
  float *m = sc.m.data(), *l = sc.l.data();
  for (int64_t r = 0; r < rows; r++) {
    int64_t token = t.t0 + r / group, head = t.head * group + r % group;
    std::memcpy(q + r * dp, a.q + (token * a.heads + head) * dim, dim * sizeof(float));
    std::memset(q + r * dp + dim, 0, (dp - dim) * sizeof(float));
    std::memset(acc + r * dp, 0, dp * sizeof(float));
    m[r] = kNegInf;
    l[r] = 0.0f;
  }
  // Row pointers of this tile and of the next (prefetched while this one computes).
  Cursor cur(a, t.head, t.k_lo);
  const void** kp = sc.kp.data();
  const void** vp = sc.vp.data();
  const void** nkp = sc.nkp.data();
  const void** nvp = sc.nvp.data();
  int n = cur.take<E>(t.k_hi, kp, vp);
  for (int64_t p0 = t.k_lo; n > 0;) {
    int n_next = cur.take<E>(t.k_hi, nkp, nvp);
    Prefetch next{nkp, nvp, n_next, dim * static_cast<int64_t>(sizeof(typename E::T))};
    if (!direct) {
      convert_rows<E>(kp, n, dim, dp, sc.kt.data());
      convert_rows<E>(vp, n, dim, dp, sc.vt.data());
      for (int j = 0; j < n; j++) {
        kp[j] = sc.kt.data() + j * dp;
        vp[j] = sc.vt.data() + j * dp;
      }
    }
    // Keys past n (to a whole vector of keys) repeat key n-1; their scores are ignored.
    for (int j = n; j < (n + VL - 1) / VL * VL; j++) kp[j] = kp[n - 1];
    if (direct) {
      scores_rows<E>(q, rows, dp, kp, n, s, &next);
    } else {
      scores_rows<F32>(q, rows, dp, kp, n, s, &next);
    }
    for (int64_t r = 0; r < rows; r++) {
      int64_t visible = a.causal ? a.causal_offset + t.t0 + r / group - p0 + 1 : n;
      softmax_row(s + r * kTileKeys, n, visible, m + r, l + r, acc + r * dp, dp);
    }
    if (direct) {
      pv_rows<E>(s, rows, dp, vp, n, acc);
    } else {
      pv_rows<F32>(s, rows, dp, vp, n, acc);
    }
    std::swap(kp, nkp);
    std::swap(vp, nvp);
    p0 += n;
    n = n_next;
  }
  for (int64_t r = 0; r < rows; r++) {
    float* row = acc + r * dp;
    if (t.slot >= 0) {
      float* part = plan.partials.data() + (t.slot + r) * (dp + 2);
      part[0] = m[r];
      part[1] = l[r];
      std::memcpy(part + 2, row, dp * sizeof(float));
      continue;
    }
    int64_t token = t.t0 + r / group, head = t.head * group + r % group;
    float* out = a.out + (token * a.heads + head) * dim;
    if (l[r] > 0.0f) {
      float inv = 1.0f / l[r];
      for (int64_t d = 0; d < dim; d++) out[d] = row[d] * inv;
      a.lse[token * a.heads + head] = m[r] + static_cast<float>(std::log(double(l[r])));
    } else {
      std::memset(out, 0, dim * sizeof(float));
      a.lse[token * a.heads + head] = kNegInf;
    }
  }
}

void run_one(void* ctx, int64_t i) {
  Plan& plan = *static_cast<Plan*>(ctx);
  try {
    switch (plan.a->dtype) {
      case kF32: run_task<F32>(plan, plan.tasks[i]); break;
      case kF16: run_task<F16>(plan, plan.tasks[i]); break;
      case kBF16: run_task<BF16>(plan, plan.tasks[i]); break;
      case kE4M3: run_task<E4M3>(plan, plan.tasks[i]); break;
      case kE5M2: run_task<E5M2>(plan, plan.tasks[i]); break;
      default: plan.failed.store(1);
    }
  } catch (const std::bad_alloc&) {
    plan.failed.store(2);
  }
}

// The split key ranges of rows [t0, t1) of one head, merged exactly into the output.
void merge_splits(Plan& plan, const Task* first, int64_t splits) {
  const TkArgs& a = *plan.a;
  const int64_t group = plan.group, dp = plan.dp, dim = a.dim;
  const int64_t rows = (first->t1 - first->t0) * group;
  for (int64_t r = 0; r < rows; r++) {
    float top = kNegInf;
    for (int64_t s = 0; s < splits; s++) {
      float ms = plan.partials[(first[s].slot + r) * (dp + 2)];
      top = ms > top ? ms : top;
    }
    int64_t token = first->t0 + r / group, head = first->head * group + r % group;
    float* out = a.out + (token * a.heads + head) * dim;
    std::memset(out, 0, dim * sizeof(float));
    if (top == kNegInf) {
      a.lse[token * a.heads + head] = kNegInf;
      continue;
    }
    double total = 0.0;
    for (int64_t s = 0; s < splits; s++) {
      const float* part = plan.partials.data() + (first[s].slot + r) * (dp + 2);
      if (part[0] == kNegInf) continue;
      float w = std::exp(part[0] - top);
      total += double(w) * part[1];
      for (int64_t d = 0; d < dim; d++) out[d] += w * part[2 + d];
    }
    float inv = static_cast<float>(1.0 / total);
    for (int64_t d = 0; d < dim; d++) out[d] *= inv;
    a.lse[token * a.heads + head] = top + static_cast<float>(std::log(total));
  }
}

// Units are (KV head, query tile); a unit's keys split into ranges when there are too few
// units to keep every thread busy. Longer causal units (later query tiles) go first.
int64_t plan_tasks(Plan& plan, int threads, std::vector<int64_t>& unit_splits) {
  const TkArgs& a = *plan.a;
  const int64_t tile = kTileRows / plan.group > 0 ? kTileRows / plan.group : 1;
  const int64_t qtiles = (a.q_tokens + tile - 1) / tile;
  const int64_t units = qtiles * a.kv_heads;
  const int64_t want = threads > 1 ? 4 * int64_t(threads) : 1;
  const int64_t split = (want + units - 1) / units;
  int64_t slots = 0;
  double work = 0;
  for (int64_t qt = qtiles - 1; qt >= 0; qt--) {
    int64_t t0 = qt * tile, t1 = t0 + tile < a.q_tokens ? t0 + tile : a.q_tokens;
    int64_t end = a.seq;
    if (a.causal) {
      int64_t last = a.causal_offset + t1;  // one past the last query's position
      end = last < 0 ? 0 : (last < a.seq ? last : a.seq);
    }
    int64_t rows = (t1 - t0) * plan.group;
    int64_t n = end / kMinSplitKeys;
    n = split < n ? split : n;
    n = n > 1 ? n : 1;
    for (int64_t h = 0; h < a.kv_heads; h++) {
      unit_splits.push_back(n);
      for (int64_t s = 0; s < n; s++) {
        // Split at tile boundaries, so every range but the last is whole tiles.
        int64_t tiles = (end + kTileKeys - 1) / kTileKeys;
        int64_t lo = tiles * s / n * kTileKeys, hi = tiles * (s + 1) / n * kTileKeys;
        hi = hi < end ? hi : end;
        lo = lo < end ? lo : end;
        int64_t slot = n > 1 ? slots : -1;
        if (n > 1) slots += rows;
        plan.tasks.push_back(Task{h, t0, t1, lo, hi, slot});
      }
    }
    work += double(end) * rows * a.kv_heads * a.dim;
  }
  plan.partials.resize(slots * (plan.dp + 2));
  return work < kInlineWork ? 0 : threads - 1;
}

}  // namespace
}  // namespace tk

extern "C" {

// Which storage dtypes this build reads (bit i: dtype code i).
__attribute__((visibility("default"))) int32_t tk_dtypes(void) { return 0x1f; }

__attribute__((visibility("default"))) int32_t tk_vector_floats(void) { return tk::VL; }

// 0 on success; 1: bad arguments, 2: out of memory.
__attribute__((visibility("default"))) int32_t tk_attend(const TkArgs* a) {
  using namespace tk;
  if (a->kv_heads <= 0 || a->heads % a->kv_heads != 0 || a->dim <= 0 || a->q_tokens <= 0 ||
      a->block_tokens <= 0 || a->seq < 0 || a->seq > a->n_blocks * a->block_tokens ||
      a->dtype < 0 || a->dtype > kE5M2)
    return 1;
  try {
    Plan plan;
    plan.a = a;
    plan.group = a->heads / a->kv_heads;
    plan.dp = (a->dim + VL - 1) / VL * VL;
    std::vector<int64_t> unit_splits;
    int threads = a->threads > 0 ? a->threads : 1;
    int helpers = static_cast<int>(plan_tasks(plan, threads, unit_splits));
    Job job;
    job.fn = run_one;
    job.ctx = &plan;
    job.n = static_cast<int64_t>(plan.tasks.size());
    job.helpers = helpers;
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
