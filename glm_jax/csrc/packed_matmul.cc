// y [M, O] = x [M, K] @ W.T for a weight W [O, K] stored in tiles of four rows: w [T, K, 4], w[t, k, r] = W[4t + r, k]
// (rows past O are zero). A tile streams its four rows in one sequential run, k by k.
//
// Few rows (decode, up to 16): per k, 8 rows of x sit in one register (x transposed, [K, 8]) and each weight is
// broadcast and multiplied into it, so every lane of every FMA is useful at 8 rows. Three tiles are read side by side:
// one sequential stream gets about 60% of a core's memory bandwidth here, three nearly all of it. One row (M = 1) is a
// matrix-vector product instead: two k of a tile per 8-lane FMA against x expanded to [K, 4]. Many rows (prefill) go
// 24 at a time over each tile while it is in cache.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kRows = 4;     // rows per tile
constexpr int kStreams = 3;  // tiles read side by side: 3 x 4 accumulators

struct Problem {
  const float *x, *w;
  int64_t M, K, T;
  float* y;
  const float* xs;  // x rearranged: M = 1 (K even): xe [K, 4]; else ceil(M / 8) blocks of xT [K, 8], zero past M
};

// Groups i < count of S tiles (tile t0 + i + s * step for s < S) against the blocks [b_begin, b_end) of 8 rows of x
// (x transposed), NB blocks at a time: S * NB * 4 accumulators, per k NB loads of x and 4 S broadcasts of weights.
// (The loops over groups and blocks live here: with them outside, GCC 12 keeps the accumulators in memory.)
template <int S, int NB>
__attribute__((noinline)) void tiles_x8(const Problem& P, int64_t t0, int64_t count, int64_t step, int64_t b_begin,
                                        int64_t b_end) {
  const int64_t K = P.K, ld = P.T * kRows;
  for (int64_t i = 0; i < count; ++i)
    for (int64_t b0 = b_begin; b0 < b_end; b0 += NB) {
      const float* xT[NB];
      for (int b = 0; b < NB; ++b) xT[b] = P.xs + (b0 + b) * K * 8;
      const float* wt[S];
      for (int s = 0; s < S; ++s) wt[s] = P.w + (t0 + i + s * step) * K * kRows;
      __m256 acc[S][NB][kRows];
      for (int s = 0; s < S; ++s)
        for (int b = 0; b < NB; ++b)
          for (int r = 0; r < kRows; ++r) acc[s][b][r] = _mm256_setzero_ps();
      for (int64_t k = 0; k < K; ++k) {
        __m256 xk[NB];
        for (int b = 0; b < NB; ++b) xk[b] = _mm256_load_ps(xT[b] + 8 * k);
        for (int s = 0; s < S; ++s)
          for (int r = 0; r < kRows; ++r) {
            const __m256 wk = _mm256_broadcast_ss(wt[s] + k * kRows + r);
            for (int b = 0; b < NB; ++b) acc[s][b][r] = _mm256_fmadd_ps(wk, xk[b], acc[s][b][r]);
          }
      }
      alignas(32) float out[S][NB][kRows][8];  // lane m of acc[s][b][r]: y[8 (b0 + b) + m, 4 (t0 + i + s step) + r]
      for (int s = 0; s < S; ++s)
        for (int b = 0; b < NB; ++b)
          for (int r = 0; r < kRows; ++r) _mm256_store_ps(out[s][b][r], acc[s][b][r]);
      for (int b = 0; b < NB; ++b) {
        const int64_t rows = std::min<int64_t>(8, P.M - 8 * (b0 + b));
        for (int s = 0; s < S; ++s)
          for (int64_t m = 0; m < rows; ++m)
            for (int r = 0; r < kRows; ++r)
              P.y[(8 * (b0 + b) + m) * ld + (t0 + i + s * step) * kRows + r] = out[s][b][r][m];
      }
    }
}

// The same for one row of x, expanded (xe [K, 4], xe[k, r] = x[k]; K even): two k per FMA, halves added at the end.
template <int S>
__attribute__((noinline)) void tiles_x1(const Problem& P, int64_t t0, int64_t count, int64_t step) {
  const int64_t K = P.K;
  const float* xe = P.xs;
  for (int64_t i = 0; i < count; ++i) {
    const float* wt[S];
    for (int s = 0; s < S; ++s) wt[s] = P.w + (t0 + i + s * step) * K * kRows;
    __m256 acc[S][2];
    for (int s = 0; s < S; ++s) acc[s][0] = acc[s][1] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) {  // two accumulators per tile: FMA latency
      const __m256 x0 = _mm256_load_ps(xe + 4 * k), x1 = _mm256_load_ps(xe + 4 * k + 8);
      for (int s = 0; s < S; ++s) {
        acc[s][0] = _mm256_fmadd_ps(_mm256_loadu_ps(wt[s] + 4 * k), x0, acc[s][0]);
        acc[s][1] = _mm256_fmadd_ps(_mm256_loadu_ps(wt[s] + 4 * k + 8), x1, acc[s][1]);
      }
    }
    for (; k < K; k += 2)
      for (int s = 0; s < S; ++s)
        acc[s][0] = _mm256_fmadd_ps(_mm256_loadu_ps(wt[s] + 4 * k), _mm256_load_ps(xe + 4 * k), acc[s][0]);
    for (int s = 0; s < S; ++s) {
      const __m256 a = _mm256_add_ps(acc[s][0], acc[s][1]);
      _mm_storeu_ps(P.y + (t0 + i + s * step) * kRows,
                    _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1)));
    }
  }
}

// Tiles [begin, end). Up to 16 rows of x: kStreams runs of tiles side by side (the range cut in kStreams parts), then
// the remainder one by one. More rows: compute-bound, one tile at a time against three blocks of 8 rows at once.
void run_tiles(const Problem& P, int64_t begin, int64_t end) {
  const int64_t n = end - begin, blocks = (P.M + 7) / 8;
  if (P.M == 1 && P.K % 2 == 0) {
    const int64_t per = n / kStreams, rest = begin + kStreams * per;
    tiles_x1<kStreams>(P, begin, per, per);
    tiles_x1<1>(P, rest, end - rest, 0);
  } else if (blocks < 3) {
    const int64_t per = n / kStreams, rest = begin + kStreams * per;
    tiles_x8<kStreams, 1>(P, begin, per, per, 0, blocks);
    tiles_x8<1, 1>(P, rest, end - rest, 0, 0, blocks);
  } else {
    const int64_t triples = blocks / 3 * 3;
    tiles_x8<1, 3>(P, begin, n, 0, 0, triples);
    tiles_x8<1, 1>(P, begin, n, 0, triples, blocks);
  }
}

ffi::Error PackedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                        ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[2] != kRows || wd[1] != xd[1] || yd.size() != 2 || yd[0] != xd[0] ||
      yd[1] != wd[0] * kRows)
    return ffi::Error::InvalidArgument("glm_jax_packed_matmul: expected x [M, K], w [T, K, 4] and y [M, 4T]");
  Problem P{x.typed_data(), w.typed_data(), xd[0], xd[1], wd[0], y->typed_data(), nullptr};
  if (P.M == 0 || P.T == 0) return ffi::Error::Success();
  // x rearranged once, on this thread, for every chunk
  std::vector<float, AlignedAllocator<float>> xs;
  if (P.M == 1 && P.K % 2 == 0) {
    xs.resize(P.K * 4);
    for (int64_t k = 0; k < P.K; ++k) std::fill_n(xs.data() + 4 * k, 4, P.x[k]);
  } else {
    const int64_t blocks = (P.M + 7) / 8;
    xs.assign(blocks * P.K * 8, 0.0f);
    for (int64_t m = 0; m < P.M; ++m)
      for (int64_t k = 0; k < P.K; ++k) xs[((m / 8) * P.K + k) * 8 + m % 8] = P.x[m * P.K + k];
  }
  P.xs = xs.data();
  // about four chunks of tiles per thread (at least kStreams tiles each)
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunk = std::max<int64_t>(kStreams, (P.T + 4 * threads - 1) / (4 * threads));
  const int64_t chunks = (P.T + chunk - 1) / chunk;
  parallel_chunks(pool, chunks, [P, chunk](int64_t i) { run_tiles(P, i * chunk, std::min(P.T, (i + 1) * chunk)); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GlmPackedMatmul, PackedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
