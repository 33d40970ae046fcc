// Fused paged decode attention on CPU; the contract is documented in ../paged_decode.py.
//
// One work unit is a sequence and a span of its kv heads: the unit reads each of its key rows
// once, scores it against every query head of those kv heads' GQA groups, keeps the scores in
// a per-thread buffer, takes an exact softmax (max, exp, sum), then reads each value row once
// and accumulates the outputs. K/V are never copied, whatever their dtype; the arithmetic is
// float32.

// Only the light ATen/dispatcher headers: torch/extension.h (pybind + the C++ frontend) would
// quadruple the one-time build. The op is registered with the dispatcher instead of pybind.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#ifdef __F16C__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

// Built with -fassociative-math (see paged_decode.py), which lets gcc split this sum over
// vector lanes and finish with shuffles; `omp simd reduction` instead sums the lanes through a
// stack array one scalar add at a time, which cost more than the loop itself at hd = 64.
inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float acc = 0.f;
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

inline void axpy(float w, const float* __restrict x, float* __restrict y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += w * x[i];
}

// exp(x) for the softmax, where x = score - max <= 0. glibc's expf is a scalar call (plus a
// vzeroupper per element), which made the softmax cost as much as both passes over K and V;
// this branch-free version vectorises. Cephes polynomial, relative error ~2 ulp.
inline float exp_nonpos(float x) {
  x = std::max(x, -87.0f);  // exp(-87) ~ 1.6e-38 is still a normal float: 2^n stays valid
  const float n = std::floor(x * 1.44269504f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;  // x - n ln2 in two steps
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}

// float rows are used in place; half/bfloat16 rows are widened into `buf` first so that the
// dot/axpy loops above stay pure-float. c10's scalar conversions do not vectorise, so bfloat16
// is widened by shifting its bits and half with the F16C instruction where the CPU has it.
template <typename T>
inline const float* as_float(const T* src, float* buf, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else if constexpr (std::is_same_v<T, at::BFloat16>) {
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t bits = static_cast<uint32_t>(src[i].x) << 16;
      std::memcpy(buf + i, &bits, sizeof(float));
    }
    return buf;
  } else {
    int64_t i = 0;
#ifdef __F16C__
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(buf + i,
                       _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
    for (; i < n; ++i) buf[i] = static_cast<float>(src[i]);
    return buf;
  }
}

// Blocks sit at random places in a large cache, so the hardware prefetcher cannot run ahead
// across them: without this the kernel stalls on DRAM latency, not bandwidth.
template <int kLocality, typename T>
inline void prefetch_rows(const T* base, int64_t rows, int64_t row_stride, int64_t n) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < n; i += 64 / static_cast<int64_t>(sizeof(T)))  // one per cache line
      __builtin_prefetch(base + r * row_stride + i, 0, kLocality);
}

template <typename T>
void run(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
         const at::Tensor& tables, const at::Tensor& lens, at::Tensor& out, float scale) {
  const int64_t num = q.size(0), heads = q.size(1), hd = q.size(2);
  const int64_t bs = k_cache.size(1), kvh = k_cache.size(2), group = heads / kvh;
  const int64_t max_blocks = tables.size(1);
  const int64_t ks_block = k_cache.stride(0), ks_row = k_cache.stride(1);
  const int64_t vs_block = v_cache.stride(0), vs_row = v_cache.stride(1);
  const T* qp = q.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  const int64_t max_len = num ? *std::max_element(lp, lp + num) : 0;
  const int64_t nthreads = at::get_num_threads();

  // A unit is one sequence and a span of `span` kv heads. The widest span that still leaves
  // ~4 units per thread: the heads of a block row are adjacent, so a wide unit streams whole
  // rows (25% faster than one head per unit at D = 64), while D = 1 still splits by head.
  int64_t span = kvh;
  while (span > 1 && (kvh % span != 0 || num * (kvh / span) < 4 * nthreads)) --span;
  const int64_t spans = kvh / span, uheads = span * group, units = num * spans;

  // One contiguous range of units per thread, split by cost (context length + a fixed
  // per-unit overhead), not by count: at::parallel_for's static split would leave one thread
  // idle while another works through the long contexts of a mixed batch.
  const int64_t threads = std::max<int64_t>(1, std::min(nthreads, units));
  std::vector<int64_t> cost(units + 1, 0);
  for (int64_t u = 0; u < units; ++u) cost[u + 1] = cost[u] + lp[u / spans] + 16;
  std::vector<int64_t> bounds(threads + 1, units);
  bounds[0] = 0;
  for (int64_t c = 1; c < threads; ++c) {
    const int64_t target = cost[units] * c / threads;
    bounds[c] = std::lower_bound(cost.begin(), cost.end(), target) - cost.begin();
  }

  at::parallel_for(0, threads, 1, [&](int64_t c0, int64_t c1) {
    // scores[j * len + t] for the unit's query head j and key t; rows widened from half types
    std::vector<float> scores(uheads * max_len), qf(uheads * hd), acc(uheads * hd);
    std::vector<float> row(span * hd), maxes(uheads);
    for (int64_t u = bounds[c0]; u < bounds[c1]; ++u) {
      const int64_t d = u / spans, g0 = (u % spans) * span, len = lp[d];
      const int64_t nblocks = (len + bs - 1) / bs, width = span * hd;
      const int64_t* table = tp + d * max_blocks;
      auto rows_in = [&](int64_t b) { return std::min(bs, len - b * bs); };
      const T* qd = qp + (d * heads + g0 * group) * hd;  // the unit's query heads are adjacent
      for (int64_t i = 0; i < uheads * hd; ++i) qf[i] = static_cast<float>(qd[i]) * scale;

      // Pass 1: scores = (scale * q_j) . k_t, and per-head maxima. Query head j of the unit
      // reads kv head j / group of the span.
      std::fill(maxes.begin(), maxes.end(), -std::numeric_limits<float>::infinity());
      for (int64_t b = 0; b < nblocks; ++b) {
        const T* kb = kp + table[b] * ks_block + g0 * hd;
        // K one block ahead into L1; this block's V into L2, ready for pass 2. Measured here:
        // about a quarter less time than without; two blocks ahead was no better.
        if (b + 1 < nblocks)
          prefetch_rows<3>(kp + table[b + 1] * ks_block + g0 * hd, rows_in(b + 1), ks_row, width);
        prefetch_rows<2>(vp + table[b] * vs_block + g0 * hd, rows_in(b), vs_row, width);
        for (int64_t r = 0; r < rows_in(b); ++r) {
          const float* k = as_float(kb + r * ks_row, row.data(), width);
          for (int64_t j = 0; j < uheads; ++j) {
            const float sc = dot(qf.data() + j * hd, k + (j / group) * hd, hd);
            scores[j * len + b * bs + r] = sc;
            maxes[j] = std::max(maxes[j], sc);
          }
        }
      }
      for (int64_t j = 0; j < uheads; ++j) {
        float* s = scores.data() + j * len;
        float sum = 0.f;
        for (int64_t t = 0; t < len; ++t) {
          s[t] = exp_nonpos(s[t] - maxes[j]);
          sum += s[t];
        }
        // Normalise the weights, not the output, so pass 2 is a plain weighted sum.
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < len; ++t) s[t] *= inv;
      }

      // Pass 2: out_j = sum_t p_jt v_t, each value row read once for all the unit's heads.
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t b = 0; b < nblocks; ++b) {
        const T* vb = vp + table[b] * vs_block + g0 * hd;
        if (b + 1 < nblocks)  // from L2, or from memory when a long context evicted it
          prefetch_rows<3>(vp + table[b + 1] * vs_block + g0 * hd, rows_in(b + 1), vs_row, width);
        for (int64_t r = 0; r < rows_in(b); ++r) {
          const float* v = as_float(vb + r * vs_row, row.data(), width);
          for (int64_t j = 0; j < uheads; ++j)
            axpy(scores[j * len + b * bs + r], v + (j / group) * hd, acc.data() + j * hd, hd);
        }
      }
      T* od = op + (d * heads + g0 * group) * hd;
      for (int64_t i = 0; i < uheads * hd; ++i) od[i] = static_cast<T>(acc[i]);
    }
  });
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& tables, const at::Tensor& lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q must be a contiguous (D, heads, hd) tensor");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "k_cache/v_cache must both be (num_blocks, block_size, kv_heads, hd)");
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(),
              "CPU tensors only");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "q, k_cache and v_cache must share a dtype");
  const int64_t num = q.size(0), heads = q.size(1), hd = q.size(2);
  const int64_t num_blocks = k_cache.size(0), bs = k_cache.size(1), kvh = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == hd, "head_dim mismatch between q and the cache");
  TORCH_CHECK(kvh > 0 && heads % kvh == 0, "heads must be a multiple of kv_heads");
  for (const at::Tensor* c : {&k_cache, &v_cache})
    TORCH_CHECK(c->stride(3) == 1 && c->stride(2) == hd && c->stride(1) == kvh * hd,
                "each cache block must be contiguous (block_size, kv_heads, hd)");
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == num && tables.is_contiguous() &&
                  tables.scalar_type() == at::kLong,
              "block_tables must be a contiguous (D, max_blocks) int64 tensor");
  TORCH_CHECK(lens.dim() == 1 && lens.size(0) == num && lens.is_contiguous() &&
                  lens.scalar_type() == at::kLong,
              "context_lens must be a contiguous (D,) int64 tensor");

  // Validate every block the kernel will touch up front: a bad id would otherwise be an
  // out-of-bounds read inside the parallel region. This is O(D * blocks), not O(tokens).
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  for (int64_t d = 0; d < num; ++d) {
    TORCH_CHECK(lp[d] >= 1 && lp[d] <= tables.size(1) * bs, "context_lens[", d, "] = ", lp[d],
                " is outside [1, max_blocks * block_size]");
    for (int64_t b = 0; b < (lp[d] + bs - 1) / bs; ++b) {
      const int64_t id = tp[d * tables.size(1) + b];
      TORCH_CHECK(id >= 0 && id < num_blocks, "block_tables[", d, ", ", b, "] = ", id,
                  " is not a block of the cache");
    }
  }

  at::Tensor out = at::empty_like(q);
  const float s = static_cast<float>(scale);
  switch (q.scalar_type()) {
    case at::kFloat: run<float>(q, k_cache, v_cache, tables, lens, out, s); break;
    case at::kBFloat16: run<at::BFloat16>(q, k_cache, v_cache, tables, lens, out, s); break;
    case at::kHalf: run<at::Half>(q, k_cache, v_cache, tables, lens, out, s); break;
    default: TORCH_CHECK(false, "unsupported dtype ", q.scalar_type());
  }
  return out;
}

}  // namespace

// A fragment, so other kernels may add ops to the same namespace.
TORCH_LIBRARY_FRAGMENT(kunserve, m) {
  m.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(kunserve, CPU, m) { m.impl("paged_decode", &paged_decode); }
