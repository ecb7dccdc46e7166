// Sparse x dense matmul kernels for ipu_sparse.sparse (CPU).
//
// y (B, rows) = x (B, cols) @ W^T + bias, where W (rows, cols) is stored in one of
// two formats (see ipu_sparse/sparse/formats.py):
//   bitmap: mask (rows, ceil(cols/8)) uint8, bit j of byte b <=> column 8b+j;
//           row_ptr (rows+1) int32; values (nnz) packed row-major.
//   csr16:  row_ptr (rows+1) int32; col_idx (nnz) 16-bit (stored int16, read as uint16);
//           values (nnz).
// Values are fp32, bf16 or fp16; accumulation is always fp32. x, bias and y are fp32.
// bitmap also takes int8 values with per-row fp32 scales: y[r] = scales[r] * sum(q * x) + bias[r]
// (the row kernels accumulate the int8 values widened to fp32; the scale is applied once per row).
// q8_matmul: a dense int8 matrix (rows, cols) with fp32 scales (rows, G) per group of cols/G columns
// (the int8 LM head), batch-1 GEMV per row (and per row of x for a few rows).
//
// Code paths, chosen at run time (never by compile flags, so one build runs on any x86-64):
//   avx512: AVX-512F/BW/VL (masked loads, in-register expand, 16-wide gathers)
//   avx2:   AVX2+FMA+F16C (256-entry permutation tables expand 8-column chunks)
//   scalar: portable C++
// Batch 1 (decode) uses a per-row dot product that never touches zero weights' values;
// batch > 1 transposes x into (cols, BC) blocks and does one BC-wide FMA per non-zero.
// Rows are split across threads with at::parallel_for (torch's OpenMP pool).
//
// The kernels trust their inputs' index structure: the Python side validates every
// format on construction and on checkpoint load; here we check shapes and dtypes.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <immintrin.h>

#include "mask_bits.h"
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

enum Isa { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };

int detect_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("popcnt"))
    return ISA_AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
      __builtin_cpu_supports("popcnt"))
    return ISA_AVX2;
  return ISA_SCALAR;
}

const int g_best_isa = detect_isa();
int g_isa = g_best_isa;

const char* isa_name(int isa) {
  return isa == ISA_AVX512 ? "avx512" : isa == ISA_AVX2 ? "avx2" : "scalar";
}

// ----- value types --------------------------------------------------------------
struct F32 { using T = float; };
struct BF16 { using T = uint16_t; };
struct F16 { using T = uint16_t; };
struct I8 { using T = int8_t; };

inline __attribute__((always_inline)) float to_f32(float v, F32) { return v; }
inline __attribute__((always_inline)) float to_f32(uint16_t v, BF16) {
  uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline __attribute__((always_inline)) float to_f32(uint16_t v, F16) { return c10::detail::fp16_ieee_to_fp32_value(v); }
inline __attribute__((always_inline)) float to_f32(int8_t v, I8) { return float(v); }

using ipu_sparse_csrc::load_bits;  // mask_bits.h

// ----- AVX-512 batch-1 kernels ------------------------------------------------------

#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c,popcnt,bmi,bmi2")))
#define AVX2_TARGET __attribute__((target("avx2,fma,f16c,popcnt,bmi,bmi2")))

// Load `n` (<= 16) packed values and widen them to fp32 lanes 0..n-1 (masked: no over-read).
AVX512_TARGET inline __m512 load_packed16(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
AVX512_TARGET inline __m512 load_packed16_bf16(const uint16_t* p, __mmask16 k) {
  __m256i raw = _mm256_maskz_loadu_epi16(k, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
AVX512_TARGET inline __m512 load_packed16_f16(const uint16_t* p, __mmask16 k) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
}
AVX512_TARGET inline __m512 load_packed16(const float* p, __mmask16 k, F32) { return load_packed16(p, k); }
AVX512_TARGET inline __m512 load_packed16(const uint16_t* p, __mmask16 k, BF16) { return load_packed16_bf16(p, k); }
AVX512_TARGET inline __m512 load_packed16(const uint16_t* p, __mmask16 k, F16) { return load_packed16_f16(p, k); }
AVX512_TARGET inline __m512 load_packed16(const int8_t* p, __mmask16 k, I8) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(k, p)));
}

// Weights of 16 consecutive columns with bitmap `m`: the next popcount(m) packed values, expanded
// to the set lanes (zero elsewhere).
template <typename V>
AVX512_TARGET inline __m512 expand16(const typename V::T*& p, uint32_t m) {
  const int n = __builtin_popcount(m);
  __m512 w = load_packed16(p, (__mmask16)((1u << n) - 1u), V());
  p += n;
  return _mm512_maskz_expand_ps((__mmask16)m, w);
}

template <typename V>
AVX512_TARGET void bitmap_gemv_avx512(const float* x, const uint8_t* mask, int64_t row_bytes, int64_t cols,
                                      const int32_t* row_ptr, const typename V::T* vals, const float* bias, float* y,
                                      int64_t r0, int64_t r1) {
  const int64_t n16 = cols / 16;
  const int64_t rem = cols - n16 * 16;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* m = mask + r * row_bytes;
    const typename V::T* p = vals + row_ptr[r];
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 4 <= n16; c += 4) {
      // 64 columns per step. The four value offsets come straight from prefix popcounts of one
      // 64-bit word, so the loads do not wait on each other (a running `p += popcount` chain
      // would serialise them).
      uint64_t w;
      std::memcpy(&w, m + 2 * c, 8);
      const int o1 = __builtin_popcountll(w & 0xFFFFull);
      const int o2 = __builtin_popcountll(w & 0xFFFFFFFFull);
      const int o3 = __builtin_popcountll(w & 0xFFFFFFFFFFFFull);
      const typename V::T* p0 = p;
      const typename V::T* p1 = p + o1;
      const typename V::T* p2 = p + o2;
      const typename V::T* p3 = p + o3;
      p += __builtin_popcountll(w);
      a0 = _mm512_fmadd_ps(expand16<V>(p0, uint32_t(w & 0xFFFF)), _mm512_loadu_ps(x + 16 * c), a0);
      a1 = _mm512_fmadd_ps(expand16<V>(p1, uint32_t((w >> 16) & 0xFFFF)), _mm512_loadu_ps(x + 16 * c + 16), a1);
      a2 = _mm512_fmadd_ps(expand16<V>(p2, uint32_t((w >> 32) & 0xFFFF)), _mm512_loadu_ps(x + 16 * c + 32), a2);
      a3 = _mm512_fmadd_ps(expand16<V>(p3, uint32_t(w >> 48)), _mm512_loadu_ps(x + 16 * c + 48), a3);
    }
    for (; c < n16; ++c) {
      uint16_t w;
      std::memcpy(&w, m + 2 * c, 2);
      a0 = _mm512_fmadd_ps(expand16<V>(p, w), _mm512_loadu_ps(x + 16 * c), a0);
    }
    if (rem) {
      uint32_t w = m[2 * c];
      if (rem > 8) w |= uint32_t(m[2 * c + 1]) << 8;
      const __mmask16 kx = (__mmask16)((1u << rem) - 1u);
      a1 = _mm512_fmadd_ps(expand16<V>(p, w), _mm512_maskz_loadu_ps(kx, x + 16 * c), a1);
    }
    const float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    y[r] = s + (bias ? bias[r] : 0.f);
  }
}

AVX512_TARGET inline __m512i load_idx16(const uint16_t* c, __mmask16 k) {
  return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, c));
}

template <typename V>
AVX512_TARGET void csr_gemv_avx512(const float* x, const int32_t* row_ptr, const uint16_t* col,
                                   const typename V::T* vals, const float* bias, float* y, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t k = row_ptr[r];
    const int64_t end = row_ptr[r + 1];
    for (; k + 32 <= end; k += 32) {
      __m512 w0 = load_packed16(vals + k, (__mmask16)0xFFFF, V());
      __m512 w1 = load_packed16(vals + k + 16, (__mmask16)0xFFFF, V());
      __m512 x0 = _mm512_i32gather_ps(load_idx16(col + k, 0xFFFF), x, 4);
      __m512 x1 = _mm512_i32gather_ps(load_idx16(col + k + 16, 0xFFFF), x, 4);
      a0 = _mm512_fmadd_ps(w0, x0, a0);
      a1 = _mm512_fmadd_ps(w1, x1, a1);
    }
    for (; k < end; k += 16) {
      const int64_t n = end - k < 16 ? end - k : 16;
      const __mmask16 km = (__mmask16)((1u << n) - 1u);
      __m512 w0 = load_packed16(vals + k, km, V());
      __m512 x0 = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), km, load_idx16(col + k, km), x, 4);
      a0 = _mm512_fmadd_ps(w0, x0, a0);
    }
    y[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) + (bias ? bias[r] : 0.f);
  }
}

// ----- AVX2 batch-1 kernels -----------------------------------------------------------

struct ExpandTables {
  alignas(32) int32_t perm[256][8];  // lane i takes packed element perm[m][i]
  alignas(32) int32_t lane[256][8];  // -1 where bit i of m is set
  ExpandTables() {
    for (int m = 0; m < 256; ++m) {
      int k = 0;
      for (int i = 0; i < 8; ++i) {
        const bool set = (m >> i) & 1;
        perm[m][i] = set ? k : 0;
        lane[m][i] = set ? -1 : 0;
        k += set;
      }
    }
  }
};
const ExpandTables g_tables;

AVX2_TARGET inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
AVX2_TARGET inline __m256 load8(const uint16_t* p, BF16) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
AVX2_TARGET inline __m256 load8(const uint16_t* p, F16) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
AVX2_TARGET inline __m256 load8(const float* p, F32) { return load8(p); }
AVX2_TARGET inline __m256 load8(const int8_t* p, I8) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}

template <typename V>
AVX2_TARGET void bitmap_gemv_avx2(const float* x, const uint8_t* mask, int64_t row_bytes, int64_t cols,
                                  const int32_t* row_ptr, const typename V::T* vals, const typename V::T* vals_end,
                                  const float* bias, float* y, int64_t r0, int64_t r1) {
  const int64_t n8 = cols / 8;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* m = mask + r * row_bytes;
    const typename V::T* p = vals + row_ptr[r];
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c < n8; ++c) {
      const uint32_t w = m[c];
      if (!w) continue;
      __m256 packed;
      if (p + 8 <= vals_end) {
        packed = load8(p, V());
      } else {  // the last few values of the matrix: never read past the end
        alignas(32) float tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int i = 0; i < __builtin_popcount(w); ++i) tmp[i] = to_f32(p[i], V());
        packed = _mm256_load_ps(tmp);
      }
      p += __builtin_popcount(w);
      __m256 wv = _mm256_permutevar8x32_ps(packed, _mm256_load_si256((const __m256i*)g_tables.perm[w]));
      wv = _mm256_and_ps(wv, _mm256_castsi256_ps(_mm256_load_si256((const __m256i*)g_tables.lane[w])));
      if (c & 1)
        a1 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + 8 * c), a1);
      else
        a0 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + 8 * c), a0);
    }
    a0 = _mm256_add_ps(a0, a1);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a0), _mm256_extractf128_ps(a0, 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    float acc = _mm_cvtss_f32(s);
    if (cols > 8 * n8) {  // last partial byte
      uint32_t w = m[n8];
      while (w) {
        const int t = __builtin_ctz(w);
        acc += to_f32(*p++, V()) * x[8 * n8 + t];
        w &= w - 1;
      }
    }
    y[r] = acc + (bias ? bias[r] : 0.f);
  }
}

// ----- dense int8 GEMV (the int8 LM head) ---------------------------------------------------

// Rows [r0, r1) of y (B, rows) = x (B, cols) @ (q * scales)^T + bias; group size gs = cols / groups, a
// multiple of 16 (the driver checks). Each weight row is read once and used for all B rows of x.
AVX512_TARGET void q8_gemv_avx512(const float* x, int64_t B, const int8_t* q, const float* scales, int64_t cols,
                                  int64_t groups, const float* bias, float* y, int64_t rows, int64_t r0, int64_t r1) {
  const int64_t gs = cols / groups;
  for (int64_t r = r0; r < r1; ++r) {
    const int8_t* w = q + r * cols;
    const float* s = scales + r * groups;
    for (int64_t b = 0; b < B; ++b) {
      const float* xb = x + b * cols;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t g = 0; g < groups; ++g) {
        __m512 t0 = _mm512_setzero_ps(), t1 = _mm512_setzero_ps();
        const int64_t end = (g + 1) * gs;
        int64_t j = g * gs;
        for (; j + 32 <= end; j += 32) {
          const __m512i w32 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(w + j)));
          const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(w32)));
          const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(w32, 1)));
          t0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb + j), t0);
          t1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + j + 16), t1);
        }
        for (; j < end; j += 16)
          t0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + j)))),
                               _mm512_loadu_ps(xb + j), t0);
        acc = _mm512_fmadd_ps(_mm512_add_ps(t0, t1), _mm512_set1_ps(s[g]), acc);
      }
      y[b * rows + r] = _mm512_reduce_add_ps(acc) + (bias ? bias[r] : 0.f);
    }
  }
}

AVX2_TARGET void q8_gemv_avx2(const float* x, int64_t B, const int8_t* q, const float* scales, int64_t cols,
                              int64_t groups, const float* bias, float* y, int64_t rows, int64_t r0, int64_t r1) {
  const int64_t gs = cols / groups;
  for (int64_t r = r0; r < r1; ++r) {
    const int8_t* w = q + r * cols;
    const float* s = scales + r * groups;
    for (int64_t b = 0; b < B; ++b) {
      const float* xb = x + b * cols;
      __m256 acc = _mm256_setzero_ps();
      for (int64_t g = 0; g < groups; ++g) {
        __m256 t0 = _mm256_setzero_ps(), t1 = _mm256_setzero_ps();
        for (int64_t j = g * gs; j < (g + 1) * gs; j += 16) {
          t0 = _mm256_fmadd_ps(load8(w + j, I8()), _mm256_loadu_ps(xb + j), t0);
          t1 = _mm256_fmadd_ps(load8(w + j + 8, I8()), _mm256_loadu_ps(xb + j + 8), t1);
        }
        acc = _mm256_fmadd_ps(_mm256_add_ps(t0, t1), _mm256_set1_ps(s[g]), acc);
      }
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
      h = _mm_hadd_ps(h, h);
      h = _mm_hadd_ps(h, h);
      y[b * rows + r] = _mm_cvtss_f32(h) + (bias ? bias[r] : 0.f);
    }
  }
}

// ----- the generic loops, compiled once per code path ---------------------------------------

namespace isa_scalar {
#include "generic_loops.h"
}  // namespace isa_scalar

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,popcnt,bmi,bmi2")
namespace isa_avx2 {
#include "generic_loops.h"
}  // namespace isa_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c,popcnt,bmi,bmi2")
namespace isa_avx512 {
#include "generic_loops.h"
}  // namespace isa_avx512
#pragma GCC pop_options

// ----- drivers -----------------------------------------------------------------------------

// Rows per parallel task: enough non-zeros per task that the fork/join cost is amortised.
int64_t grain_rows(int64_t rows, int64_t nnz, int64_t batch) {
  const int64_t per_row = nnz / (rows > 0 ? rows : 1) + 1;
  int64_t g = (int64_t(1) << 14) / (per_row * (batch > 0 ? batch : 1)) + 1;
  return g < 1 ? 1 : g;
}

int block_width(int64_t b) { return b <= 4 ? 4 : b <= 8 ? 8 : b <= 16 ? 16 : b <= 32 ? 32 : 64; }

// x (B, cols) rows [b0, b0+nb) -> xt (cols, BC), zero-padded columns beyond nb.
void transpose_block(const float* x, int64_t cols, int64_t b0, int64_t nb, int BC, float* xt) {
  std::memset(xt, 0, sizeof(float) * cols * BC);
  for (int64_t j = 0; j < nb; ++j) {
    const float* xr = x + (b0 + j) * cols;
    for (int64_t c = 0; c < cols; ++c) xt[c * BC + j] = xr[c];
  }
}

// y[j, r] = scales[r] * y[j, r] + bias[r] for rows [r0, r1) of nb output rows (int8 values).
inline void scale_rows(const float* scales, const float* bias, float* y, int64_t ldy, int64_t nb, int64_t r0,
                       int64_t r1) {
  for (int64_t j = 0; j < nb; ++j) {
    float* yj = y + j * ldy;
    for (int64_t r = r0; r < r1; ++r) yj[r] = yj[r] * scales[r] + (bias ? bias[r] : 0.f);
  }
}

template <typename V>
void run_bitmap(const float* x, int64_t B, int64_t cols, const uint8_t* mask, int64_t row_bytes, const int32_t* row_ptr,
                const typename V::T* vals, int64_t nnz, const float* bias_in, float* y, int64_t rows,
                const float* scales = nullptr) {
  const int isa = g_isa;
  // With scales the row kernels add no bias; scale_rows applies scale and bias to each finished row.
  const float* bias = scales ? nullptr : bias_in;
  if (B == 1) {
    at::parallel_for(0, rows, grain_rows(rows, nnz, 1), [&](int64_t r0, int64_t r1) {
      if (isa == ISA_AVX512)
        bitmap_gemv_avx512<V>(x, mask, row_bytes, cols, row_ptr, vals, bias, y, r0, r1);
      else if (isa == ISA_AVX2)
        bitmap_gemv_avx2<V>(x, mask, row_bytes, cols, row_ptr, vals, vals + nnz, bias, y, r0, r1);
      else
        isa_scalar::bitmap_gemv<V>(x, mask, row_bytes, row_ptr, vals, bias, y, r0, r1);
      if (scales) scale_rows(scales, bias_in, y, rows, 1, r0, r1);
    });
    return;
  }
  const int BC = block_width(B);
  std::vector<float> xt(size_t(cols) * BC);
  for (int64_t b0 = 0; b0 < B; b0 += BC) {
    const int64_t nb = B - b0 < BC ? B - b0 : BC;
    transpose_block(x, cols, b0, nb, BC, xt.data());
    float* yb = y + b0 * rows;
    const float* xtp = xt.data();
    at::parallel_for(0, rows, grain_rows(rows, nnz, BC), [&](int64_t r0, int64_t r1) {
#define BITMAP_SPMM_CASE(W)                                                                               \
  case W:                                                                                                 \
    if (isa == ISA_AVX512)                                                                                \
      isa_avx512::bitmap_spmm<W, V>(xtp, mask, row_bytes, row_ptr, vals, bias, yb, rows, nb, r0, r1);        \
    else if (isa == ISA_AVX2)                                                                             \
      isa_avx2::bitmap_spmm<W, V>(xtp, mask, row_bytes, row_ptr, vals, bias, yb, rows, nb, r0, r1);          \
    else                                                                                                  \
      isa_scalar::bitmap_spmm<W, V>(xtp, mask, row_bytes, row_ptr, vals, bias, yb, rows, nb, r0, r1);         \
    break;
      switch (BC) {
        BITMAP_SPMM_CASE(4)
        BITMAP_SPMM_CASE(8)
        BITMAP_SPMM_CASE(16)
        BITMAP_SPMM_CASE(32)
        BITMAP_SPMM_CASE(64)
      }
#undef BITMAP_SPMM_CASE
      if (scales) scale_rows(scales, bias_in, yb, rows, nb, r0, r1);
    });
  }
}

template <typename V>
void run_csr(const float* x, int64_t B, int64_t cols, const int32_t* row_ptr, const uint16_t* col,
             const typename V::T* vals, int64_t nnz, const float* bias, float* y, int64_t rows) {
  const int isa = g_isa;
  if (B == 1) {
    at::parallel_for(0, rows, grain_rows(rows, nnz, 1), [&](int64_t r0, int64_t r1) {
      if (isa == ISA_AVX512)
        csr_gemv_avx512<V>(x, row_ptr, col, vals, bias, y, r0, r1);
      else if (isa == ISA_AVX2)
        isa_avx2::csr_gemv<V>(x, row_ptr, col, vals, bias, y, r0, r1);
      else
        isa_scalar::csr_gemv<V>(x, row_ptr, col, vals, bias, y, r0, r1);
    });
    return;
  }
  const int BC = block_width(B);
  std::vector<float> xt(size_t(cols) * BC);
  for (int64_t b0 = 0; b0 < B; b0 += BC) {
    const int64_t nb = B - b0 < BC ? B - b0 : BC;
    transpose_block(x, cols, b0, nb, BC, xt.data());
    float* yb = y + b0 * rows;
    const float* xtp = xt.data();
    at::parallel_for(0, rows, grain_rows(rows, nnz, BC), [&](int64_t r0, int64_t r1) {
#define CSR_SPMM_CASE(W)                                                                  \
  case W:                                                                                 \
    if (isa == ISA_AVX512)                                                                \
      isa_avx512::csr_spmm<W, V>(xtp, row_ptr, col, vals, bias, yb, rows, nb, r0, r1);        \
    else if (isa == ISA_AVX2)                                                             \
      isa_avx2::csr_spmm<W, V>(xtp, row_ptr, col, vals, bias, yb, rows, nb, r0, r1);          \
    else                                                                                  \
      isa_scalar::csr_spmm<W, V>(xtp, row_ptr, col, vals, bias, yb, rows, nb, r0, r1);         \
    break;
      switch (BC) {
        CSR_SPMM_CASE(4)
        CSR_SPMM_CASE(8)
        CSR_SPMM_CASE(16)
        CSR_SPMM_CASE(32)
        CSR_SPMM_CASE(64)
      }
#undef CSR_SPMM_CASE
    });
  }
}

void check_common(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& values,
                  const c10::optional<at::Tensor>& bias, int64_t rows, int64_t cols) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "x must be a contiguous 2-D fp32 CPU tensor");
  TORCH_CHECK(x.size(1) == cols, "x has ", x.size(1), " features, weight has ", cols, " columns");
  TORCH_CHECK(row_ptr.scalar_type() == at::kInt && row_ptr.dim() == 1 && row_ptr.numel() == rows + 1 &&
                  row_ptr.is_contiguous(),
              "row_ptr must be a contiguous int32 tensor of rows+1 entries");
  TORCH_CHECK(values.dim() == 1 && values.is_contiguous(), "values must be a contiguous 1-D tensor");
  const auto st = values.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf || st == at::kChar,
              "values must be fp32, bf16, fp16 (or int8 with scales, bitmap only)");
  const int32_t total = row_ptr.data_ptr<int32_t>()[rows];
  TORCH_CHECK(values.numel() == total, "values has ", values.numel(), " entries but row_ptr says ", total);
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->numel() == rows &&
                    bias->is_contiguous(),
                "bias must be a contiguous fp32 tensor of `rows` entries");
  }
}

at::Tensor bitmap_matmul(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& row_ptr,
                         const at::Tensor& values, const c10::optional<at::Tensor>& bias, int64_t rows, int64_t cols,
                         const c10::optional<at::Tensor>& scales) {
  check_common(x, row_ptr, values, bias, rows, cols);
  const bool quantized = values.scalar_type() == at::kChar;
  TORCH_CHECK(quantized == scales.has_value(), "scales must be given exactly when values are int8");
  if (quantized) {
    TORCH_CHECK(scales->scalar_type() == at::kFloat && scales->dim() == 1 && scales->numel() == rows &&
                    scales->is_contiguous(),
                "scales must be a contiguous fp32 tensor of `rows` entries");
  }
  const int64_t row_bytes = (cols + 7) / 8;
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.dim() == 2 && mask.size(0) == rows &&
                  mask.size(1) == row_bytes && mask.is_contiguous(),
              "mask must be a contiguous uint8 tensor of shape (rows, ceil(cols/8))");
  const int64_t B = x.size(0);
  at::Tensor y = at::empty({B, rows}, x.options());
  if (B == 0 || rows == 0) return y;
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const auto* m = mask.data_ptr<uint8_t>();
  const auto* rp = row_ptr.data_ptr<int32_t>();
  const int64_t nnz = values.numel();
  switch (values.scalar_type()) {
    case at::kChar:
      run_bitmap<I8>(x.data_ptr<float>(), B, cols, m, row_bytes, rp, reinterpret_cast<const int8_t*>(values.data_ptr()),
                     nnz, bp, y.data_ptr<float>(), rows, scales->data_ptr<float>());
      break;
    case at::kFloat:
      run_bitmap<F32>(x.data_ptr<float>(), B, cols, m, row_bytes, rp, values.data_ptr<float>(), nnz, bp,
                      y.data_ptr<float>(), rows);
      break;
    case at::kBFloat16:
      run_bitmap<BF16>(x.data_ptr<float>(), B, cols, m, row_bytes, rp,
                       reinterpret_cast<const uint16_t*>(values.data_ptr()), nnz, bp, y.data_ptr<float>(), rows);
      break;
    default:
      run_bitmap<F16>(x.data_ptr<float>(), B, cols, m, row_bytes, rp,
                      reinterpret_cast<const uint16_t*>(values.data_ptr()), nnz, bp, y.data_ptr<float>(), rows);
  }
  return y;
}

at::Tensor csr_matmul(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                      const at::Tensor& values, const c10::optional<at::Tensor>& bias, int64_t rows, int64_t cols) {
  check_common(x, row_ptr, values, bias, rows, cols);
  TORCH_CHECK(values.scalar_type() != at::kChar, "csr16 does not store int8 values (use the bitmap format)");
  TORCH_CHECK(cols <= 65536, "csr16 supports at most 65536 columns");
  TORCH_CHECK(col_idx.scalar_type() == at::kShort && col_idx.dim() == 1 && col_idx.numel() == values.numel() &&
                  col_idx.is_contiguous(),
              "col_idx must be a contiguous int16 tensor with one entry per value");
  const int64_t B = x.size(0);
  at::Tensor y = at::empty({B, rows}, x.options());
  if (B == 0 || rows == 0) return y;
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const auto* rp = row_ptr.data_ptr<int32_t>();
  const auto* ci = reinterpret_cast<const uint16_t*>(col_idx.data_ptr());
  const int64_t nnz = values.numel();
  switch (values.scalar_type()) {
    case at::kFloat:
      run_csr<F32>(x.data_ptr<float>(), B, cols, rp, ci, values.data_ptr<float>(), nnz, bp, y.data_ptr<float>(), rows);
      break;
    case at::kBFloat16:
      run_csr<BF16>(x.data_ptr<float>(), B, cols, rp, ci, reinterpret_cast<const uint16_t*>(values.data_ptr()), nnz, bp,
                    y.data_ptr<float>(), rows);
      break;
    default:
      run_csr<F16>(x.data_ptr<float>(), B, cols, rp, ci, reinterpret_cast<const uint16_t*>(values.data_ptr()), nnz, bp,
                   y.data_ptr<float>(), rows);
  }
  return y;
}

at::Tensor q8_matmul(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "x must be a contiguous 2-D fp32 CPU tensor");
  TORCH_CHECK(qweight.device().is_cpu() && qweight.scalar_type() == at::kChar && qweight.dim() == 2 &&
                  qweight.is_contiguous(),
              "qweight must be a contiguous 2-D int8 CPU tensor");
  const int64_t rows = qweight.size(0), cols = qweight.size(1);
  TORCH_CHECK(x.size(1) == cols, "x has ", x.size(1), " features, qweight has ", cols, " columns");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 2 && scales.size(0) == rows &&
                  scales.size(1) >= 1 && scales.is_contiguous(),
              "scales must be a contiguous fp32 tensor of shape (rows, groups)");
  const int64_t groups = scales.size(1);
  TORCH_CHECK(cols % groups == 0, "scales has ", groups, " groups, which do not divide ", cols, " columns");
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->numel() == rows &&
                    bias->is_contiguous(),
                "bias must be a contiguous fp32 tensor of `rows` entries");
  }
  const int64_t B = x.size(0);
  at::Tensor y = at::empty({B, rows}, x.options());
  if (B == 0 || rows == 0) return y;
  const float* xp = x.data_ptr<float>();
  const auto* q = reinterpret_cast<const int8_t*>(qweight.data_ptr());
  const float* sp = scales.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t gs = cols / groups;
  const int isa = (gs % 16 == 0) ? g_isa : ISA_SCALAR;  // SIMD paths take whole 16-column steps
  at::parallel_for(0, rows, grain_rows(rows, rows * cols, B), [&](int64_t r0, int64_t r1) {
    if (isa == ISA_AVX512)
      q8_gemv_avx512(xp, B, q, sp, cols, groups, bp, yp, rows, r0, r1);
    else if (isa == ISA_AVX2)
      q8_gemv_avx2(xp, B, q, sp, cols, groups, bp, yp, rows, r0, r1);
    else
      isa_scalar::q8_gemv(xp, B, q, sp, cols, groups, bp, yp, rows, r0, r1);
  });
  return y;
}

std::string get_isa() { return isa_name(g_isa); }
std::string best_isa() { return isa_name(g_best_isa); }

void set_isa(const std::string& name) {
  int want = name == "avx512" ? ISA_AVX512 : name == "avx2" ? ISA_AVX2 : name == "scalar" ? ISA_SCALAR : -1;
  TORCH_CHECK(want >= 0, "unknown ISA '", name, "' (avx512, avx2, scalar)");
  TORCH_CHECK(want <= g_best_isa, "this CPU does not support ", name, " (best: ", isa_name(g_best_isa), ")");
  g_isa = want;
}

}  // namespace

void register_decode_engine(pybind11::module& m);  // decode_engine.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ipu_sparse sparse x dense CPU kernels (bitmap and csr16 formats)";
  m.def("bitmap_matmul", &bitmap_matmul, "y = x @ W.T + bias, W in bitmap format (int8 values need scales)",
        py::arg("x"), py::arg("mask"), py::arg("row_ptr"), py::arg("values"), py::arg("bias"), py::arg("rows"),
        py::arg("cols"), py::arg("scales") = py::none());
  m.def("q8_matmul", &q8_matmul, "y = x @ W.T + bias, W = qweight (rows, cols) int8 * scales (rows, G) per group",
        py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("bias") = py::none());
  m.def("csr_matmul", &csr_matmul, "y = x @ W.T + bias, W in csr16 format", py::arg("x"), py::arg("row_ptr"),
        py::arg("col_idx"), py::arg("values"), py::arg("bias"), py::arg("rows"), py::arg("cols"));
  m.def("isa", &get_isa, "the code path in use");
  m.def("best_isa", &best_isa, "the best code path this CPU supports");
  m.def("set_isa", &set_isa, "force a code path (avx512, avx2, scalar) no better than best_isa()");
  register_decode_engine(m);
}
