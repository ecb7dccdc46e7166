// Whole-model batch-1 decode step in C++ (ipu_sparse.sparse._kernels.DecodeEngine).
//
// Why: a decode step of SmolLM2-135M from Python makes ~210 projection calls plus ~20 small ops per
// layer, each ~15 us of dispatch even for a 576x192 matrix, i.e. several ms per token of pure
// overhead; this engine runs the whole token (embedding lookup -> 30 layers -> LM head) inside ONE
// OpenMP parallel region with spin barriers between the ops, so the per-op cost is a barrier
// (well under 1 us) instead of a Python round trip.
//
// One token step:
//   x = embed[token]                                   (fp32 residual stream)
//   per layer: xn = norm(x); [q|k|v] = one parallel loop over the concatenated rows of the three
//              projections; RoPE (cos/sin tables from the model's own rope code) on k -> KV-cache
//              append (the model's KVCache tensors, shared with the torch prefill); RoPE on q;
//              GQA attention over the filled prefix (fp32 scores/softmax); x += o(att);
//              xn = norm(x); gate/up rows r in the same thread -> h = silu(g) * u (or gelu(u));
//              x += down(h)
//   logits = head(norm(x))                              (fp32)
// Rows of each phase are split between the threads by bytes read (a sparse row's cost is its
// values + its mask), so the threads finish together.
//
// Weights are read in place from the model's tensors (pointers, no copies):
//   dense   W (rows, cols) fp32 / bf16 / fp16 (nn.Linear, LowPrecisionLinear, tied embedding)
//   bitmap  mask, row_ptr, values fp32 / bf16 / fp16, or int8 values with per-row fp32 scales
//   qdense  int8 qweight (rows, cols) with fp32 scales (rows, G), group = cols / G
// Numerics: fp32 accumulation everywhere; fp32 / fp16 / int8 weights multiply the fp32 activations;
// dense bf16 weights use AVX512-BF16 dot products with the activations rounded to bf16 (what a bf16
// nn.Linear does); bitmap bf16 values are widened to fp32 (what SparseLinear does).
//
// Code paths, chosen at run time (target attributes, never -march): avx512 (F/BW/VL/DQ + VBMI2 +
// BF16: Sapphire Rapids, Zen 4) and a portable scalar path for every other CPU.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <omp.h>
#include <sched.h>

#include <immintrin.h>

#include "mask_bits.h"
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <tuple>
#include <vector>

namespace {

enum ValueType { VT_F32 = 0, VT_BF16 = 1, VT_F16 = 2, VT_I8 = 3 };
enum MatKind { MK_DENSE = 0, MK_BITMAP = 1, MK_QDENSE = 2 };
enum EngineIsa { EI_SCALAR = 0, EI_AVX512 = 1 };

int engine_best_isa() {
  __builtin_cpu_init();
  const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                  __builtin_cpu_supports("avx512vbmi2") && __builtin_cpu_supports("avx512bf16") &&
                  __builtin_cpu_supports("avx512vnni") &&
                  __builtin_cpu_supports("popcnt");
  return ok ? EI_AVX512 : EI_SCALAR;
}

int value_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return VT_F32;
    case at::kBFloat16: return VT_BF16;
    case at::kHalf: return VT_F16;
    case at::kChar: return VT_I8;
    default: TORCH_CHECK(false, "DecodeEngine: unsupported dtype ", t.scalar_type());
  }
  return VT_F32;
}

inline float bf16_to_f32(uint16_t v) {
  uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline uint16_t f32_to_bf16(float f) {  // round to nearest even (finite inputs)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
inline float f16_to_f32(uint16_t v) { return c10::detail::fp16_ieee_to_fp32_value(v); }
inline uint16_t f32_to_f16(float f) { return c10::detail::fp16_ieee_from_fp32_value(f); }

inline float load_value(const void* p, int vt, int64_t i) {
  switch (vt) {
    case VT_F32: return static_cast<const float*>(p)[i];
    case VT_BF16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case VT_F16: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default: return float(static_cast<const int8_t*>(p)[i]);
  }
}
inline void store_value(void* p, int vt, int64_t i, float v) {
  switch (vt) {
    case VT_F32: static_cast<float*>(p)[i] = v; break;
    case VT_BF16: static_cast<uint16_t*>(p)[i] = f32_to_bf16(v); break;
    default: static_cast<uint16_t*>(p)[i] = f32_to_f16(v); break;
  }
}
inline int value_size(int vt) { return vt == VT_F32 ? 4 : vt == VT_I8 ? 1 : 2; }

using ipu_sparse_csrc::load_bits;  // mask_bits.h

struct Mat {
  int kind = MK_DENSE, vt = VT_F32;
  int64_t rows = 0, cols = 0, row_bytes = 0, groups = 1;
  const void* w = nullptr;            // dense weight / bitmap values / qweight
  const uint8_t* mask = nullptr;      // bitmap
  const int32_t* row_ptr = nullptr;   // bitmap
  const float* scales = nullptr;      // int8 bitmap (rows,) / qdense (rows, groups)
  const void* bias = nullptr;
  int bias_vt = VT_F32;
  bool bf16_dot = false;  // bitmap bf16: dot products with bf16-rounded x (else widen to fp32)
  // int8 weights (bitmap values, or a per-row-scaled qdense head): VNNI dot products with x quantized
  // to 8 bits per 64-column block (see q8_rows_avx512).
  bool q8_dot = false;

  double row_cost(int64_t r) const {  // bytes read for row r
    if (kind == MK_BITMAP) return double(row_ptr[r + 1] - row_ptr[r]) * value_size(vt) + row_bytes + 8;
    return double(cols) * value_size(vt) + 8;
  }
  bool wants_bf16_x() const { return vt == VT_BF16 && (kind == MK_DENSE || bf16_dot); }
  bool wants_split_x() const { return vt == VT_BF16 && kind == MK_BITMAP && !bf16_dot; }
  bool wants_q8_x() const { return q8_dot; }
};

// ----- scalar kernels (any CPU) -------------------------------------------------------------------

float row_dot_scalar(const Mat& m, int64_t r, const float* x, const uint16_t* xb) {
  const int64_t cols = m.cols;
  float acc = 0.f;
  if (m.kind == MK_DENSE) {
    if (m.vt == VT_BF16) {
      const uint16_t* w = static_cast<const uint16_t*>(m.w) + r * cols;
      for (int64_t c = 0; c < cols; ++c) acc += bf16_to_f32(w[c]) * bf16_to_f32(xb[c]);
    } else {
      for (int64_t c = 0; c < cols; ++c) acc += load_value(m.w, m.vt, r * cols + c) * x[c];
    }
  } else if (m.kind == MK_QDENSE) {
    const int8_t* w = static_cast<const int8_t*>(m.w) + r * cols;
    const int64_t gs = cols / m.groups;
    for (int64_t g = 0; g < m.groups; ++g) {
      float a = 0.f;
      for (int64_t c = g * gs; c < (g + 1) * gs; ++c) a += float(w[c]) * x[c];
      acc += a * m.scales[r * m.groups + g];
    }
  } else {
    const uint8_t* mk = m.mask + r * m.row_bytes;
    int64_t k = m.row_ptr[r];
    const bool xb16 = m.vt == VT_BF16 && m.bf16_dot;
    for (int64_t b = 0; b < m.row_bytes; ++b) {
      uint32_t bits = mk[b];
      while (bits) {
        const int t = __builtin_ctz(bits);
        acc += load_value(m.w, m.vt, k++) * (xb16 ? bf16_to_f32(xb[8 * b + t]) : x[8 * b + t]);
        bits &= bits - 1;
      }
    }
    if (m.vt == VT_I8) acc *= m.scales[r];
  }
  return acc;
}

// ----- AVX-512 kernels ----------------------------------------------------------------------------

#define ENGINE_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,avx512bf16,avx512vnni,avx2,fma,f16c,popcnt,bmi,bmi2")))

ENGINE_AVX512 inline __m512 widen_bf16(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// Dense rows [r0, r1): 4 rows at a time share each load of x.
ENGINE_AVX512 void dense_rows_avx512(const Mat& m, int64_t r0, int64_t r1, const float* x, const uint16_t* xb,
                                     float* y) {
  const int64_t cols = m.cols;
  if (m.vt == VT_BF16) {
    const uint16_t* W = static_cast<const uint16_t*>(m.w);
    const int64_t n32 = cols / 32, rem = cols % 32;
    const __mmask32 kt = (__mmask32)((1ull << rem) - 1ull);
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) {
      const uint16_t* w0 = W + r * cols;
      const uint16_t* w1 = w0 + cols;
      const uint16_t* w2 = w1 + cols;
      const uint16_t* w3 = w2 + cols;
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
      for (int64_t c = 0; c < n32; ++c) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(xb + 32 * c);
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w0 + 32 * c), xv);
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w1 + 32 * c), xv);
        a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(w2 + 32 * c), xv);
        a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(w3 + 32 * c), xv);
      }
      if (rem) {
        const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(kt, xb + 32 * n32);
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_maskz_loadu_epi16(kt, w0 + 32 * n32), xv);
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_maskz_loadu_epi16(kt, w1 + 32 * n32), xv);
        a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_maskz_loadu_epi16(kt, w2 + 32 * n32), xv);
        a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_maskz_loadu_epi16(kt, w3 + 32 * n32), xv);
      }
      y[r] = _mm512_reduce_add_ps(a0);
      y[r + 1] = _mm512_reduce_add_ps(a1);
      y[r + 2] = _mm512_reduce_add_ps(a2);
      y[r + 3] = _mm512_reduce_add_ps(a3);
    }
    for (; r < r1; ++r) {
      const uint16_t* w0 = W + r * cols;
      __m512 a0 = _mm512_setzero_ps();
      for (int64_t c = 0; c < n32; ++c)
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w0 + 32 * c), (__m512bh)_mm512_loadu_si512(xb + 32 * c));
      if (rem)
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_maskz_loadu_epi16(kt, w0 + 32 * n32),
                              (__m512bh)_mm512_maskz_loadu_epi16(kt, xb + 32 * n32));
      y[r] = _mm512_reduce_add_ps(a0);
    }
    return;
  }
  const int64_t n16 = cols / 16, rem = cols % 16;
  const __mmask16 kt = (__mmask16)((1u << rem) - 1u);
  // fp32 / fp16 weights (or int8 qweight) widened to fp32 lanes, times fp32 x
  auto load16 = [&](const void* base, int64_t off, __mmask16 k) ENGINE_AVX512 -> __m512 {
    if (m.vt == VT_F32) return _mm512_maskz_loadu_ps(k, static_cast<const float*>(base) + off);
    if (m.vt == VT_F16) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, static_cast<const uint16_t*>(base) + off));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(k, static_cast<const int8_t*>(base) + off)));
  };
  if (m.kind == MK_QDENSE && m.groups > 1) {
    const int64_t gs = cols / m.groups, g16 = gs / 16;  // gs % 16 == 0 (checked at construction)
    for (int64_t r = r0; r < r1; ++r) {
      float acc = 0.f;
      for (int64_t g = 0; g < m.groups; ++g) {
        __m512 a0 = _mm512_setzero_ps();
        for (int64_t c = 0; c < g16; ++c) {
          const int64_t col = g * gs + 16 * c;
          a0 = _mm512_fmadd_ps(load16(m.w, r * cols + col, 0xFFFF), _mm512_loadu_ps(x + col), a0);
        }
        acc += _mm512_reduce_add_ps(a0) * m.scales[r * m.groups + g];
      }
      y[r] = acc;
    }
    return;
  }
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    const int64_t o = r * cols;
    for (int64_t c = 0; c < n16; ++c) {
      const __m512 xv = _mm512_loadu_ps(x + 16 * c);
      a0 = _mm512_fmadd_ps(load16(m.w, o + 16 * c, 0xFFFF), xv, a0);
      a1 = _mm512_fmadd_ps(load16(m.w, o + cols + 16 * c, 0xFFFF), xv, a1);
      a2 = _mm512_fmadd_ps(load16(m.w, o + 2 * cols + 16 * c, 0xFFFF), xv, a2);
      a3 = _mm512_fmadd_ps(load16(m.w, o + 3 * cols + 16 * c, 0xFFFF), xv, a3);
    }
    if (rem) {
      const __m512 xv = _mm512_maskz_loadu_ps(kt, x + 16 * n16);
      a0 = _mm512_fmadd_ps(load16(m.w, o + 16 * n16, kt), xv, a0);
      a1 = _mm512_fmadd_ps(load16(m.w, o + cols + 16 * n16, kt), xv, a1);
      a2 = _mm512_fmadd_ps(load16(m.w, o + 2 * cols + 16 * n16, kt), xv, a2);
      a3 = _mm512_fmadd_ps(load16(m.w, o + 3 * cols + 16 * n16, kt), xv, a3);
    }
    y[r] = _mm512_reduce_add_ps(a0);
    y[r + 1] = _mm512_reduce_add_ps(a1);
    y[r + 2] = _mm512_reduce_add_ps(a2);
    y[r + 3] = _mm512_reduce_add_ps(a3);
  }
  for (; r < r1; ++r) {
    __m512 a0 = _mm512_setzero_ps();
    const int64_t o = r * cols;
    for (int64_t c = 0; c < n16; ++c) a0 = _mm512_fmadd_ps(load16(m.w, o + 16 * c, 0xFFFF), _mm512_loadu_ps(x + 16 * c), a0);
    if (rem) a0 = _mm512_fmadd_ps(load16(m.w, o + 16 * n16, kt), _mm512_maskz_loadu_ps(kt, x + 16 * n16), a0);
    y[r] = _mm512_reduce_add_ps(a0);
  }
  if (m.kind == MK_QDENSE)
    for (int64_t i = r0; i < r1; ++i) y[i] *= m.scales[i];
}

// Bitmap rows [r0, r1): one 64-bit mask word (64 columns) per step; the packed values of each
// 16/32/64-column piece are expanded into their lanes (VBMI2 expand-loads read exactly popcount
// values: no over-read), widened to fp32 and multiplied by x (x is zero-padded to 64 columns).
// bf16 values: the 32-bit lane j of an expanded 32-value vector holds columns 2j (low half) and 2j+1
// (high half); `<< 16` and `& 0xFFFF0000` widen them to fp32 without a shuffle, against x split into
// even and odd columns per 32-column block (xs, made once per op by prepare()).
template <int VT>
ENGINE_AVX512 void bitmap_rows_avx512(const Mat& m, int64_t r0, int64_t r1, const float* x, float* y) {
  const int64_t nwords = (m.row_bytes + 7) / 8;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* mk = m.mask + r * m.row_bytes;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t k = m.row_ptr[r];
    for (int64_t wi = 0; wi < nwords; ++wi) {
      const uint64_t bits = load_bits(mk + 8 * wi, m.row_bytes - 8 * wi);
      if (!bits) continue;
      const float* xp = x + 64 * wi;
      if (VT == VT_F32) {
        const float* p = static_cast<const float*>(m.w) + k;
        const int o1 = __builtin_popcountll(bits & 0xFFFFull), o2 = __builtin_popcountll(bits & 0xFFFFFFFFull),
                  o3 = __builtin_popcountll(bits & 0xFFFFFFFFFFFFull);
        a0 = _mm512_fmadd_ps(_mm512_maskz_expandloadu_ps((__mmask16)(bits & 0xFFFF), p), _mm512_loadu_ps(xp), a0);
        a1 = _mm512_fmadd_ps(_mm512_maskz_expandloadu_ps((__mmask16)((bits >> 16) & 0xFFFF), p + o1),
                             _mm512_loadu_ps(xp + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_maskz_expandloadu_ps((__mmask16)((bits >> 32) & 0xFFFF), p + o2),
                             _mm512_loadu_ps(xp + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_maskz_expandloadu_ps((__mmask16)(bits >> 48), p + o3), _mm512_loadu_ps(xp + 48),
                             a3);
      } else if (VT == VT_BF16 || VT == VT_F16) {
        const uint16_t* p = static_cast<const uint16_t*>(m.w) + k;
        const int o1 = __builtin_popcountll(bits & 0xFFFFFFFFull);
        const __m512i v0 = _mm512_maskz_expandloadu_epi16((__mmask32)(bits & 0xFFFFFFFFull), p);
        const __m512i v1 = _mm512_maskz_expandloadu_epi16((__mmask32)(bits >> 32), p + o1);
        __m512 w0, w1, w2, w3;
        if (VT == VT_BF16) {  // x is the split layout here
          const __m512i hi = _mm512_set1_epi32(int(0xFFFF0000u));
          w0 = _mm512_castsi512_ps(_mm512_slli_epi32(v0, 16));
          w1 = _mm512_castsi512_ps(_mm512_and_si512(v0, hi));
          w2 = _mm512_castsi512_ps(_mm512_slli_epi32(v1, 16));
          w3 = _mm512_castsi512_ps(_mm512_and_si512(v1, hi));
        } else {
          w0 = _mm512_cvtph_ps(_mm512_castsi512_si256(v0));
          w1 = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(v0, 1));
          w2 = _mm512_cvtph_ps(_mm512_castsi512_si256(v1));
          w3 = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(v1, 1));
        }
        a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp), a0);
        a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp + 16), a1);
        a2 = _mm512_fmadd_ps(w2, _mm512_loadu_ps(xp + 32), a2);
        a3 = _mm512_fmadd_ps(w3, _mm512_loadu_ps(xp + 48), a3);
      } else {
        const int8_t* p = static_cast<const int8_t*>(m.w) + k;
        const __m512i v = _mm512_maskz_expandloadu_epi8((__mmask64)bits, p);
        a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_castsi512_si128(v))), _mm512_loadu_ps(xp), a0);
        a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(v, 1))),
                             _mm512_loadu_ps(xp + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(v, 2))),
                             _mm512_loadu_ps(xp + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(v, 3))),
                             _mm512_loadu_ps(xp + 48), a3);
      }
      k += __builtin_popcountll(bits);
    }
    float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    if (VT == VT_I8) s *= m.scales[r];
    y[r] = s;
  }
}

// Bitmap bf16 rows with AVX512-BF16 dot products: 32 expanded values times 32 bf16 activations per
// instruction (x rounded to bf16, as for dense bf16 weights).
ENGINE_AVX512 void bitmap_rows_bf16dot_avx512(const Mat& m, int64_t r0, int64_t r1, const uint16_t* xb, float* y) {
  const int64_t nwords = (m.row_bytes + 7) / 8;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* mk = m.mask + r * m.row_bytes;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    const uint16_t* p = static_cast<const uint16_t*>(m.w) + m.row_ptr[r];
    for (int64_t wi = 0; wi < nwords; ++wi) {
      const uint64_t bits = load_bits(mk + 8 * wi, m.row_bytes - 8 * wi);
      const int o1 = __builtin_popcountll(bits & 0xFFFFFFFFull);
      const __m512i v0 = _mm512_maskz_expandloadu_epi16((__mmask32)(bits & 0xFFFFFFFFull), p);
      const __m512i v1 = _mm512_maskz_expandloadu_epi16((__mmask32)(bits >> 32), p + o1);
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)v0, (__m512bh)_mm512_loadu_si512(xb + 64 * wi));
      a1 = _mm512_dpbf16_ps(a1, (__m512bh)v1, (__m512bh)_mm512_loadu_si512(xb + 64 * wi + 32));
      p += __builtin_popcountll(bits);
    }
    y[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
  }
}

// int8 weights times 8-bit activations with VNNI (vpdpbusd: 64 u8 x s8 products per instruction).
// x is quantized per block of 64 columns (one scale each, as llama.cpp's Q8 activations do per 32):
// xq = round(x / xsc[block]) + 128 (uint8), padding 128 (= 0). Per block: dpbusd(xq, w) - dpbusd(128, w)
// is the exact int32 sum of q * w, converted to fp32 and scaled by the block's scale.
ENGINE_AVX512 inline __m512 q8_block(__m512 acc, const uint8_t* xq, const float* xsc, int64_t blk, __m512i v) {
  const __m512i k128 = _mm512_set1_epi8(char(-128));  // 0x80 = 128 as the unsigned operand
  const __m512i z = _mm512_setzero_si512();
  const __m512i d = _mm512_sub_epi32(_mm512_dpbusd_epi32(z, _mm512_loadu_si512(xq + 64 * blk), v),
                                     _mm512_dpbusd_epi32(z, k128, v));
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(xsc[blk]), acc);
}

ENGINE_AVX512 void q8_rows_avx512(const Mat& m, int64_t r0, int64_t r1, const uint8_t* xq, const float* xsc,
                                  float* y) {
  if (m.kind == MK_BITMAP) {
    const int64_t nwords = (m.row_bytes + 7) / 8;
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* mk = m.mask + r * m.row_bytes;
      const int8_t* p = static_cast<const int8_t*>(m.w) + m.row_ptr[r];
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
      int64_t wi = 0;
      for (; wi + 2 <= nwords; wi += 2) {
        const uint64_t b0 = load_bits(mk + 8 * wi, m.row_bytes - 8 * wi);
        const uint64_t b1 = load_bits(mk + 8 * wi + 8, m.row_bytes - 8 * wi - 8);
        const __m512i v0 = _mm512_maskz_expandloadu_epi8((__mmask64)b0, p);
        p += __builtin_popcountll(b0);
        const __m512i v1 = _mm512_maskz_expandloadu_epi8((__mmask64)b1, p);
        p += __builtin_popcountll(b1);
        a0 = q8_block(a0, xq, xsc, wi, v0);
        a1 = q8_block(a1, xq, xsc, wi + 1, v1);
      }
      for (; wi < nwords; ++wi) {
        const uint64_t b0 = load_bits(mk + 8 * wi, m.row_bytes - 8 * wi);
        const __m512i v0 = _mm512_maskz_expandloadu_epi8((__mmask64)b0, p);
        p += __builtin_popcountll(b0);
        a0 = q8_block(a0, xq, xsc, wi, v0);
      }
      y[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) * m.scales[r];
    }
    return;
  }
  // qdense, one scale per row: 4 rows share each load of x
  const int8_t* W = static_cast<const int8_t*>(m.w);
  const int64_t cols = m.cols, n64 = cols / 64, rem = cols % 64;
  const __mmask64 kt = rem ? (__mmask64)((1ull << rem) - 1ull) : (__mmask64)0;
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    const int8_t* w0 = W + r * cols;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (int64_t c = 0; c < n64; ++c) {
      a0 = q8_block(a0, xq, xsc, c, _mm512_loadu_si512(w0 + 64 * c));
      a1 = q8_block(a1, xq, xsc, c, _mm512_loadu_si512(w0 + cols + 64 * c));
      a2 = q8_block(a2, xq, xsc, c, _mm512_loadu_si512(w0 + 2 * cols + 64 * c));
      a3 = q8_block(a3, xq, xsc, c, _mm512_loadu_si512(w0 + 3 * cols + 64 * c));
    }
    if (rem) {
      a0 = q8_block(a0, xq, xsc, n64, _mm512_maskz_loadu_epi8(kt, w0 + 64 * n64));
      a1 = q8_block(a1, xq, xsc, n64, _mm512_maskz_loadu_epi8(kt, w0 + cols + 64 * n64));
      a2 = q8_block(a2, xq, xsc, n64, _mm512_maskz_loadu_epi8(kt, w0 + 2 * cols + 64 * n64));
      a3 = q8_block(a3, xq, xsc, n64, _mm512_maskz_loadu_epi8(kt, w0 + 3 * cols + 64 * n64));
    }
    y[r] = _mm512_reduce_add_ps(a0) * m.scales[r];
    y[r + 1] = _mm512_reduce_add_ps(a1) * m.scales[r + 1];
    y[r + 2] = _mm512_reduce_add_ps(a2) * m.scales[r + 2];
    y[r + 3] = _mm512_reduce_add_ps(a3) * m.scales[r + 3];
  }
  for (; r < r1; ++r) {
    const int8_t* w0 = W + r * cols;
    __m512 a0 = _mm512_setzero_ps();
    for (int64_t c = 0; c < n64; ++c) a0 = q8_block(a0, xq, xsc, c, _mm512_loadu_si512(w0 + 64 * c));
    if (rem) a0 = q8_block(a0, xq, xsc, n64, _mm512_maskz_loadu_epi8(kt, w0 + 64 * n64));
    y[r] = _mm512_reduce_add_ps(a0) * m.scales[r];
  }
}

ENGINE_AVX512 void rows_avx512(const Mat& m, int64_t r0, int64_t r1, const float* x, const uint16_t* xb,
                               const float* xs, const uint8_t* xq, const float* xsc, float* y) {
  if (m.q8_dot) return q8_rows_avx512(m, r0, r1, xq, xsc, y);
  if (m.kind != MK_BITMAP) return dense_rows_avx512(m, r0, r1, x, xb, y);
  if (m.vt == VT_BF16 && m.bf16_dot) return bitmap_rows_bf16dot_avx512(m, r0, r1, xb, y);
  switch (m.vt) {
    case VT_F32: return bitmap_rows_avx512<VT_F32>(m, r0, r1, x, y);
    case VT_BF16: return bitmap_rows_avx512<VT_BF16>(m, r0, r1, xs, y);
    case VT_F16: return bitmap_rows_avx512<VT_F16>(m, r0, r1, x, y);
    default: return bitmap_rows_avx512<VT_I8>(m, r0, r1, x, y);
  }
}

// exp for x <= 0 (softmax) and moderate |x| (SiLU): Cephes polynomial, ~1 ulp; scalef does 2^n.
ENGINE_AVX512 inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-103.0f));
  __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500E-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507E-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073E-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894E-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459E-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201E-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, fx);
}

template <int CVT>
ENGINE_AVX512 inline __m512 load_cache16(const void* base, int64_t off) {
  if (CVT == VT_F32) return _mm512_loadu_ps(static_cast<const float*>(base) + off);
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + off));
  if (CVT == VT_BF16) return widen_bf16(v);
  return _mm512_cvtph_ps(v);
}

// One query head over cache positions [0, S): scores, fp32 softmax, weighted sum of v. hd % 16 == 0.
template <int CVT>
ENGINE_AVX512 void attend_head_avx512(const float* q, const void* kc, const void* vc, int64_t base, int64_t S,
                                      int64_t hd, float scale, float* scores, float* out) {
  const int64_t n16 = hd / 16;
  __m512 mx = _mm512_set1_ps(-INFINITY);
  int64_t s = 0;
  for (; s < S; ++s) {
    __m512 a = _mm512_setzero_ps();
    for (int64_t c = 0; c < n16; ++c)
      a = _mm512_fmadd_ps(_mm512_loadu_ps(q + 16 * c), load_cache16<CVT>(kc, base + s * hd + 16 * c), a);
    scores[s] = _mm512_reduce_add_ps(a) * scale;
  }
  const int64_t Sp = (S + 15) / 16 * 16;
  for (s = S; s < Sp; ++s) scores[s] = -INFINITY;
  for (s = 0; s < Sp; s += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(scores + s));
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  __m512 sum = _mm512_setzero_ps();
  for (s = 0; s < Sp; s += 16) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(scores + s), m));
    _mm512_storeu_ps(scores + s, e);
    sum = _mm512_add_ps(sum, e);
  }
  const float inv = 1.0f / _mm512_reduce_add_ps(sum);
  for (int64_t c = 0; c < n16; ++c) {
    __m512 a = _mm512_setzero_ps();
    for (s = 0; s < S; ++s) a = _mm512_fmadd_ps(_mm512_set1_ps(scores[s]), load_cache16<CVT>(vc, base + s * hd + 16 * c), a);
    _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(a, _mm512_set1_ps(inv)));
  }
}

ENGINE_AVX512 void silu_mul_avx512(const float* g, const float* u, float* h, int64_t r0, int64_t r1) {
  int64_t r = r0;
  for (; r + 16 <= r1; r += 16) {
    const __m512 gv = _mm512_loadu_ps(g + r);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv));
    const __m512 sg = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
    _mm512_storeu_ps(h + r, _mm512_mul_ps(sg, _mm512_loadu_ps(u + r)));
  }
  for (; r < r1; ++r) h[r] = g[r] / (1.0f + std::exp(-g[r])) * u[r];
}

// ----- the engine -----------------------------------------------------------------------------------

struct Task {
  int mat;
  int64_t r0, r1, out_off;  // y[out_off + r] for r in [r0, r1)
};

struct Phase {
  std::vector<std::vector<Task>> per_thread;
  std::vector<std::pair<int64_t, int64_t>> act_range;  // gate/up phase: rows of h per thread
  bool bf16_x = false;   // some matrix reads x rounded to bf16
  bool split_x = false;  // some matrix reads x split into even/odd columns
  bool q8_x = false;     // some matrix reads x quantized to 8 bits
};

struct Input {  // one op's input vector in the layouts its matrices read
  const float* x;
  const uint16_t* xb;
  const float* xs;
  const uint8_t* xq;   // x quantized per 64-column block (offset 128)
  const float* xsc;    // the blocks' scales
};

// Spin barrier (a sense-reversing counter); yields the core after a while so an oversubscribed
// machine still makes progress.
struct SpinBarrier {
  alignas(64) std::atomic<int> count{0};
  alignas(64) std::atomic<int> gen{0};
  void wait(int n) {
    if (n <= 1) return;
    const int g = gen.load(std::memory_order_acquire);
    if (count.fetch_add(1, std::memory_order_acq_rel) + 1 == n) {
      count.store(0, std::memory_order_relaxed);
      gen.fetch_add(1, std::memory_order_acq_rel);
      return;
    }
    int spins = 0;
    while (gen.load(std::memory_order_acquire) == g) {
      if (++spins < 4000)
        _mm_pause();
      else
        sched_yield();
    }
  }
};

enum ProfileSlot { P_EMBED = 0, P_QKV, P_ROPE, P_ATTN, P_O, P_GATEUP, P_DOWN, P_HEAD, P_SLOTS };
const char* const kProfileNames[P_SLOTS] = {"embed", "norm+qkv", "rope+kv_append", "attention",
                                            "o_proj", "norm+gate_up+act", "down", "norm+head"};

class DecodeEngine {
 public:
  DecodeEngine(std::vector<int64_t> config, double eps, at::Tensor embed, std::vector<c10::optional<at::Tensor>> norms,
               std::vector<std::tuple<std::string, int64_t, int64_t, std::vector<at::Tensor>, c10::optional<at::Tensor>>>
                   mats,
               const std::string& isa, bool bf16_dot) {
    bf16_dot_ = bf16_dot;
    TORCH_CHECK(config.size() == 9, "DecodeEngine: config must be [n_layers, d_model, n_heads, n_kv_heads, head_dim, "
                "d_ff, vocab, norm(0 rms,1 layer), mlp(0 swiglu,1 gelu)]");
    L_ = config[0]; D_ = config[1]; nh_ = config[2]; nkv_ = config[3]; hd_ = config[4]; F_ = config[5]; V_ = config[6];
    layernorm_ = config[7] == 1; gelu_ = config[8] == 1;
    eps_ = float(eps);
    TORCH_CHECK(nh_ % nkv_ == 0 && hd_ % 2 == 0 && nh_ * hd_ > 0, "DecodeEngine: bad head shape");
    const int best = engine_best_isa();
    if (isa == "auto") isa_ = best;
    else if (isa == "scalar") isa_ = EI_SCALAR;
    else if (isa == "avx512") {
      TORCH_CHECK(best == EI_AVX512, "DecodeEngine: this CPU lacks AVX-512 BF16/VBMI2");
      isa_ = EI_AVX512;
    } else TORCH_CHECK(false, "DecodeEngine: unknown isa '", isa, "' (auto, avx512, scalar)");

    keep(embed);
    TORCH_CHECK(embed.dim() == 2 && embed.size(0) == V_ && embed.size(1) == D_ && embed.is_contiguous(),
                "DecodeEngine: embedding must be a contiguous (vocab, d_model) tensor");
    embed_ = embed.data_ptr();
    embed_vt_ = value_type(embed);
    TORCH_CHECK(embed_vt_ != VT_I8, "DecodeEngine: int8 embedding");

    TORCH_CHECK((int64_t)norms.size() == 4 * L_ + 2, "DecodeEngine: expected 4 norm tensors per layer + 2");
    for (auto& n : norms) {
      if (n.has_value()) {
        keep(*n);
        TORCH_CHECK(n->dim() == 1 && n->numel() == D_ && n->is_contiguous() && value_type(*n) != VT_I8,
                    "DecodeEngine: norm parameters must be contiguous (d_model,) float tensors");
        norm_p_.push_back(n->data_ptr());
        norm_vt_.push_back(value_type(*n));
      } else {
        norm_p_.push_back(nullptr);
        norm_vt_.push_back(VT_F32);
      }
    }
    per_layer_ = gelu_ ? 6 : 7;
    TORCH_CHECK((int64_t)mats.size() == per_layer_ * L_ + 1, "DecodeEngine: expected ", per_layer_,
                " matrices per layer + the head, got ", mats.size());
    const int64_t q = nh_ * hd_, kv = nkv_ * hd_;
    for (int64_t l = 0; l < L_; ++l) {
      const int64_t base = l * per_layer_;
      const std::vector<std::pair<int64_t, int64_t>> shapes =
          gelu_ ? std::vector<std::pair<int64_t, int64_t>>{{q, D_}, {kv, D_}, {kv, D_}, {D_, q}, {F_, D_}, {D_, F_}}
                : std::vector<std::pair<int64_t, int64_t>>{{q, D_}, {kv, D_}, {kv, D_}, {D_, q}, {F_, D_}, {F_, D_},
                                                            {D_, F_}};
      for (int i = 0; i < per_layer_; ++i) add_mat(mats[base + i], shapes[i].first, shapes[i].second);
    }
    add_mat(mats.back(), V_, D_);

    pad_ = std::max(std::max(D_, q), F_);
    pad_ = (pad_ + 63) / 64 * 64;
    x_.assign(pad_, 0.f);
    qkv_.assign((nh_ + 2 * nkv_) * hd_ + 64, 0.f);
    att_.assign(pad_, 0.f);
    g_.assign(pad_, 0.f);
    u_.assign(pad_, 0.f);
    h_.assign(pad_, 0.f);
  }

  void bind_cache(std::vector<at::Tensor> ks, std::vector<at::Tensor> vs, at::Tensor cos, at::Tensor sin) {
    TORCH_CHECK((int64_t)ks.size() == L_ && (int64_t)vs.size() == L_, "DecodeEngine: one k and one v cache per layer");
    cache_keep_.clear();
    kc_.clear();
    vc_.clear();
    for (int64_t l = 0; l < L_; ++l) {
      for (const at::Tensor* t : {&ks[l], &vs[l]}) {
        TORCH_CHECK(t->dim() == 4 && t->size(0) == 1 && t->size(1) == nkv_ && t->size(3) == hd_ && t->is_contiguous() &&
                        t->size(2) == ks[0].size(2) && t->scalar_type() == ks[0].scalar_type(),
                    "DecodeEngine: KV caches must be contiguous (1, n_kv_heads, max_len, head_dim), one dtype");
        cache_keep_.push_back(*t);
      }
      kc_.push_back(ks[l].data_ptr());
      vc_.push_back(vs[l].data_ptr());
    }
    cache_vt_ = value_type(ks[0]);
    TORCH_CHECK(cache_vt_ != VT_I8, "DecodeEngine: int8 KV cache");
    max_len_ = ks[0].size(2);
    TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                    sin.is_contiguous() && cos.dim() == 2 && cos.size(0) >= max_len_ && cos.size(1) == hd_ &&
                    sin.sizes() == cos.sizes(),
                "DecodeEngine: cos/sin must be contiguous fp32 (max_len, head_dim)");
    cache_keep_.push_back(cos);
    cache_keep_.push_back(sin);
    cos_ = cos.data_ptr<float>();
    sin_ = sin.data_ptr<float>();
  }

  at::Tensor step(int64_t token, int64_t pos) {
    TORCH_CHECK(!kc_.empty(), "DecodeEngine: bind_cache() first");
    TORCH_CHECK(token >= 0 && token < V_, "DecodeEngine: token ", token, " out of range");
    TORCH_CHECK(pos >= 0 && pos < max_len_, "DecodeEngine: position ", pos, " outside the cache (", max_len_, ")");
    at::Tensor logits = at::empty({V_}, at::kFloat);
    float* out = logits.data_ptr<float>();
    int T = std::max(1, at::get_num_threads());
    if (min_thread_bytes_ > 0) T = int(std::max<int64_t>(1, std::min<int64_t>(T, total_bytes_ / min_thread_bytes_)));
    plans_for(T);
    if (scores_.size() < size_t(T)) scores_.resize(T);
    for (int t = 0; t < T; ++t)
      if ((int64_t)scores_[t].size() < max_len_ + 16) scores_[t].assign(max_len_ + 16, 0.f);
    if (xn_.size() < size_t(T)) {
      xn_.resize(T);
      xb_.resize(T);
      xs_.resize(T);
      xq_.resize(T);
      xsc_.resize(T);
    }
    for (int t = 0; t < T; ++t) {
      if (xn_[t].size() < size_t(pad_)) {
        xn_[t].assign(pad_, 0.f);
        xb_[t].assign(pad_, 0);
        xs_[t].assign(pad_, 0.f);
        xq_[t].assign(pad_, 128);
        xsc_[t].assign(pad_ / 64 + 1, 1.f);
      }
    }
    if (T == 1) {
      run(0, 1, token, pos, out);
      return logits;
    }
    std::atomic<int> team{0};
#pragma omp parallel num_threads(T)
    {
      const int nt = omp_get_num_threads();
      const int tid = omp_get_thread_num();
      if (tid == 0) team.store(nt);
#pragma omp barrier
      // the plans are for T threads: a smaller team (nested call, thread limit) runs on thread 0 alone
      if (team.load() == T) {
        run(tid, T, token, pos, out);
      } else if (tid == 0) {
        plans_single_thread_run(token, pos, out);
      }
    }
    return logits;
  }

  // int8 weights: VNNI dot products with 8-bit activations (on) or int8 widened to fp32 against fp32
  // activations (off). Only the AVX-512 path has it; a grouped qdense head always widens.
  void set_int8_dot(bool on) {
    for (Mat& m : mats_) {
      m.q8_dot = on && isa_ == EI_AVX512 && m.vt == VT_I8 && (m.kind == MK_BITMAP || m.groups == 1);
    }
    plans_.clear();
  }

  // Below this many weight bytes per thread a token runs on fewer threads (0: always all of them).
  void set_min_thread_bytes(int64_t b) { min_thread_bytes_ = b; }

  void set_profile(bool on) {
    profile_ = on;
    std::fill(prof_, prof_ + P_SLOTS, 0.0);
    prof_steps_ = 0;
  }

  std::vector<std::pair<std::string, double>> profile() const {  // mean ms per step of each op kind
    std::vector<std::pair<std::string, double>> out;
    for (int i = 0; i < P_SLOTS; ++i) out.emplace_back(kProfileNames[i], prof_steps_ ? prof_[i] / prof_steps_ * 1e3 : 0.0);
    return out;
  }

  std::string isa_name() const { return isa_ == EI_AVX512 ? "avx512" : "scalar"; }

 private:
  // ----- construction helpers
  void keep(const at::Tensor& t) {
    TORCH_CHECK(t.device().is_cpu(), "DecodeEngine: tensors must be on the CPU");
    keep_.push_back(t);
  }

  void add_mat(const std::tuple<std::string, int64_t, int64_t, std::vector<at::Tensor>, c10::optional<at::Tensor>>& d,
               int64_t rows, int64_t cols) {
    const std::string& kind = std::get<0>(d);
    Mat m;
    m.rows = std::get<1>(d);
    m.cols = std::get<2>(d);
    TORCH_CHECK(m.rows == rows && m.cols == cols, "DecodeEngine: matrix is ", m.rows, "x", m.cols, ", expected ", rows,
                "x", cols);
    const auto& ts = std::get<3>(d);
    for (auto& t : ts) {
      keep(t);
      TORCH_CHECK(t.is_contiguous(), "DecodeEngine: weight tensors must be contiguous");
    }
    if (kind == "dense") {
      TORCH_CHECK(ts.size() == 1 && ts[0].dim() == 2 && ts[0].size(0) == rows && ts[0].size(1) == cols,
                  "DecodeEngine: dense weight must be (rows, cols)");
      m.kind = MK_DENSE;
      m.vt = value_type(ts[0]);
      TORCH_CHECK(m.vt != VT_I8, "DecodeEngine: int8 dense weight needs scales (kind qdense)");
      m.w = ts[0].data_ptr();
    } else if (kind == "bitmap") {
      TORCH_CHECK(ts.size() == 3 || ts.size() == 4, "DecodeEngine: bitmap needs mask, row_ptr, values[, scales]");
      m.kind = MK_BITMAP;
      m.row_bytes = (cols + 7) / 8;
      TORCH_CHECK(ts[0].scalar_type() == at::kByte && ts[0].numel() == rows * m.row_bytes, "DecodeEngine: bad mask");
      TORCH_CHECK(ts[1].scalar_type() == at::kInt && ts[1].numel() == rows + 1, "DecodeEngine: bad row_ptr");
      m.mask = ts[0].data_ptr<uint8_t>();
      m.row_ptr = ts[1].data_ptr<int32_t>();
      m.vt = value_type(ts[2]);
      TORCH_CHECK(ts[2].numel() == m.row_ptr[rows], "DecodeEngine: values do not match row_ptr");
      m.w = ts[2].data_ptr();
      if (m.vt == VT_I8) {
        TORCH_CHECK(ts.size() == 4 && ts[3].scalar_type() == at::kFloat && ts[3].numel() == rows,
                    "DecodeEngine: int8 bitmap values need fp32 scales (rows,)");
        m.scales = ts[3].data_ptr<float>();
      }
    } else if (kind == "qdense") {
      TORCH_CHECK(ts.size() == 2 && ts[0].scalar_type() == at::kChar && ts[0].numel() == rows * cols &&
                      ts[1].scalar_type() == at::kFloat && ts[1].dim() == 2 && ts[1].size(0) == rows,
                  "DecodeEngine: qdense needs int8 qweight (rows, cols) and fp32 scales (rows, G)");
      m.kind = MK_QDENSE;
      m.vt = VT_I8;
      m.w = ts[0].data_ptr();
      m.scales = ts[1].data_ptr<float>();
      m.groups = ts[1].size(1);
      TORCH_CHECK(m.groups >= 1 && cols % m.groups == 0 && (m.groups == 1 || (cols / m.groups) % 16 == 0),
                  "DecodeEngine: qdense group size must divide cols (and be a multiple of 16)");
    } else {
      TORCH_CHECK(false, "DecodeEngine: unknown matrix kind '", kind, "'");
    }
    const auto& bias = std::get<4>(d);
    if (bias.has_value()) {
      keep(*bias);
      TORCH_CHECK(bias->numel() == rows && bias->is_contiguous() && value_type(*bias) != VT_I8, "DecodeEngine: bad bias");
      m.bias = bias->data_ptr();
      m.bias_vt = value_type(*bias);
    }
    m.bf16_dot = bf16_dot_ && m.kind == MK_BITMAP;
    if (m.kind == MK_BITMAP)
      total_bytes_ += int64_t(m.row_ptr[rows]) * value_size(m.vt) + rows * (m.row_bytes + 4);
    else
      total_bytes_ += rows * cols * value_size(m.vt);
    mats_.push_back(m);
  }

  // ----- work split
  // Split the concatenated rows of `ids` (written at out offsets `offs`) into T ranges of equal cost.
  Phase split_concat(const std::vector<int>& ids, const std::vector<int64_t>& offs, int T) const {
    Phase ph;
    ph.per_thread.assign(T, {});
    double total = 0;
    for (int id : ids)
      for (int64_t r = 0; r < mats_[id].rows; ++r) total += mats_[id].row_cost(r);
    int t = 0;
    double acc = 0, next = total / T;
    for (size_t i = 0; i < ids.size(); ++i) {
      const Mat& m = mats_[ids[i]];
      ph.bf16_x = ph.bf16_x || m.wants_bf16_x();
      ph.split_x = ph.split_x || m.wants_split_x();
      ph.q8_x = ph.q8_x || m.wants_q8_x();
      int64_t start = 0;
      for (int64_t r = 0; r < m.rows; ++r) {
        acc += m.row_cost(r);
        if (acc >= next && t < T - 1) {
          if (r + 1 > start) ph.per_thread[t].push_back({ids[i], start, r + 1, offs[i]});
          start = r + 1;
          ++t;
          next = total * (t + 1) / T;
        }
      }
      if (m.rows > start) ph.per_thread[t].push_back({ids[i], start, m.rows, offs[i]});
    }
    return ph;
  }

  // Gate/up: row r of both in the same thread (so it can apply the activation without a barrier).
  Phase split_fused(const std::vector<int>& ids, int T) const {
    Phase ph;
    ph.per_thread.assign(T, {});
    ph.act_range.assign(T, {0, 0});
    const int64_t rows = mats_[ids[0]].rows;
    double total = 0;
    for (int64_t r = 0; r < rows; ++r)
      for (int id : ids) total += mats_[id].row_cost(r);
    int t = 0;
    double acc = 0, next = total / T;
    int64_t start = 0;
    auto emit = [&](int64_t end) {
      for (size_t i = 0; i < ids.size(); ++i) ph.per_thread[t].push_back({ids[i], start, end, 0});
      ph.act_range[t] = {start, end};
    };
    for (int64_t r = 0; r < rows; ++r) {
      for (int id : ids) acc += mats_[id].row_cost(r);
      if (acc >= next && t < T - 1) {
        emit(r + 1);
        start = r + 1;
        ++t;
        next = total * (t + 1) / T;
      }
    }
    emit(rows);
    for (int id : ids) {
      ph.bf16_x = ph.bf16_x || mats_[id].wants_bf16_x();
      ph.split_x = ph.split_x || mats_[id].wants_split_x();
      ph.q8_x = ph.q8_x || mats_[id].wants_q8_x();
    }
    return ph;
  }

  struct Plan {
    std::vector<Phase> qkv, o, gu, down;
    Phase head;
    std::vector<std::pair<int64_t, int64_t>> rope_items, heads;  // per thread
  };

  static std::vector<std::pair<int64_t, int64_t>> split_even(int64_t n, int T) {
    std::vector<std::pair<int64_t, int64_t>> out(T);
    for (int t = 0; t < T; ++t) out[t] = {n * t / T, n * (t + 1) / T};
    return out;
  }

  Plan& plans_for(int T) {
    auto it = plans_.find(T);
    if (it != plans_.end()) return it->second;
    Plan p;
    const int64_t q = nh_ * hd_, kv = nkv_ * hd_;
    for (int64_t l = 0; l < L_; ++l) {
      const int b = int(l * per_layer_);
      p.qkv.push_back(split_concat({b, b + 1, b + 2}, {0, q, q + kv}, T));
      p.o.push_back(split_concat({b + 3}, {0}, T));
      if (gelu_) {
        p.gu.push_back(split_fused({b + 4}, T));
        p.down.push_back(split_concat({b + 5}, {0}, T));
      } else {
        p.gu.push_back(split_fused({b + 4, b + 5}, T));
        p.down.push_back(split_concat({b + 6}, {0}, T));
      }
    }
    p.head = split_concat({int(mats_.size()) - 1}, {0}, T);
    p.rope_items = split_even(nh_ + nkv_, T);
    p.heads = split_even(nh_, T);
    return plans_.emplace(T, std::move(p)).first->second;
  }

  void plans_single_thread_run(int64_t token, int64_t pos, float* out) {
    plans_for(1);
    run(0, 1, token, pos, out);
  }

  // ----- ops
  void norm_into(const float* x, int idx, float* y) const {
    const void* w = norm_p_[idx];
    const void* b = norm_p_[idx + 1];
    const int wvt = norm_vt_[idx], bvt = norm_vt_[idx + 1];
    if (!layernorm_) {
      float ss = 0.f;
      for (int64_t i = 0; i < D_; ++i) ss += x[i] * x[i];
      const float r = 1.0f / std::sqrt(ss / float(D_) + eps_);
      for (int64_t i = 0; i < D_; ++i) y[i] = load_value(w, wvt, i) * (x[i] * r);
      return;
    }
    float mean = 0.f;
    for (int64_t i = 0; i < D_; ++i) mean += x[i];
    mean /= float(D_);
    float var = 0.f;
    for (int64_t i = 0; i < D_; ++i) var += (x[i] - mean) * (x[i] - mean);
    const float r = 1.0f / std::sqrt(var / float(D_) + eps_);
    for (int64_t i = 0; i < D_; ++i)
      y[i] = (x[i] - mean) * r * load_value(w, wvt, i) + (b ? load_value(b, bvt, i) : 0.f);
  }

  // The layouts of x (n values, zero-padded to a multiple of 64) that the phase's matrices read.
  Input prepare(const Phase& ph, const float* x, int64_t n, int tid) {
    Input in{x, xb_[tid].data(), xs_[tid].data(), xq_[tid].data(), xsc_[tid].data()};
    if (ph.q8_x) {
      uint8_t* q = xq_[tid].data();
      float* sc = xsc_[tid].data();
      for (int64_t b = 0; b < n; b += 64) {
        const int64_t e = std::min(n, b + 64);
        float amax = 0.f;
        for (int64_t i = b; i < e; ++i) amax = std::max(amax, std::fabs(x[i]));
        const float s = amax > 0.f ? amax / 127.f : 1.f, inv = 1.f / s;
        for (int64_t i = b; i < e; ++i) q[i] = uint8_t(int(std::nearbyint(x[i] * inv)) + 128);
        sc[b / 64] = s;
      }
    }
    if (ph.bf16_x)
      for (int64_t i = 0; i < n; ++i) xb_[tid][i] = f32_to_bf16(x[i]);
    if (ph.split_x && isa_ == EI_AVX512) {
      float* xs = xs_[tid].data();
      for (int64_t b = 0; b < n; b += 32)
        for (int64_t j = 0; j < 16; ++j) {
          xs[b + j] = x[b + 2 * j];
          xs[b + 16 + j] = x[b + 2 * j + 1];
        }
    }
    return in;
  }

  void run_tasks(const std::vector<Task>& tasks, const Input& in, float* y, bool accumulate) {
    for (const Task& t : tasks) run_task(t, in, y, accumulate);
  }

  void run_task(const Task& t, const Input& in, float* y, bool accumulate) {
    const float* x = in.x;
    const uint16_t* xb = in.xb;
    float tmp[256];
    {
      const Mat& m = mats_[t.mat];
      for (int64_t r0 = t.r0; r0 < t.r1; r0 += 256) {
        const int64_t r1 = std::min(t.r1, r0 + 256);
        float* dst = tmp - r0;  // dst[r] for r in [r0, r1)
        if (isa_ == EI_AVX512)
          rows_avx512(m, r0, r1, x, xb, in.xs, in.xq, in.xsc, dst);
        else
          for (int64_t r = r0; r < r1; ++r) dst[r] = row_dot_scalar(m, r, x, xb);
        float* yo = y + t.out_off;
        for (int64_t r = r0; r < r1; ++r) {
          float v = dst[r] + (m.bias ? load_value(m.bias, m.bias_vt, r) : 0.f);
          if (accumulate)
            yo[r] += v;
          else
            yo[r] = v;
        }
      }
    }
  }

  void rope(float* v, int64_t pos) const {
    const int64_t half = hd_ / 2;
    const float* c = cos_ + pos * hd_;
    const float* s = sin_ + pos * hd_;
    for (int64_t i = 0; i < half; ++i) {
      const float a = v[i], b = v[i + half];
      v[i] = a * c[i] + (-b) * s[i];
      v[i + half] = b * c[i + half] + a * s[i + half];
    }
  }

  void attend(int64_t l, int64_t h, int64_t S, float* scores, float* out) const {
    const int64_t g = h / (nh_ / nkv_);
    const float* q = qkv_.data() + h * hd_;
    const int64_t base = g * max_len_ * hd_;
    const float scale = 1.0f / std::sqrt(float(hd_));
    if (isa_ == EI_AVX512 && hd_ % 16 == 0) {
      if (cache_vt_ == VT_F32) return attend_head_avx512<VT_F32>(q, kc_[l], vc_[l], base, S, hd_, scale, scores, out);
      if (cache_vt_ == VT_BF16) return attend_head_avx512<VT_BF16>(q, kc_[l], vc_[l], base, S, hd_, scale, scores, out);
      return attend_head_avx512<VT_F16>(q, kc_[l], vc_[l], base, S, hd_, scale, scores, out);
    }
    float mx = -INFINITY;
    for (int64_t s = 0; s < S; ++s) {
      float a = 0.f;
      for (int64_t c = 0; c < hd_; ++c) a += q[c] * load_value(kc_[l], cache_vt_, base + s * hd_ + c);
      scores[s] = a * scale;
      mx = std::max(mx, scores[s]);
    }
    float sum = 0.f;
    for (int64_t s = 0; s < S; ++s) {
      scores[s] = std::exp(scores[s] - mx);
      sum += scores[s];
    }
    for (int64_t c = 0; c < hd_; ++c) out[c] = 0.f;
    for (int64_t s = 0; s < S; ++s)
      for (int64_t c = 0; c < hd_; ++c) out[c] += scores[s] * load_value(vc_[l], cache_vt_, base + s * hd_ + c);
    for (int64_t c = 0; c < hd_; ++c) out[c] /= sum;
  }

  void activation(int64_t r0, int64_t r1) {
    if (gelu_) {
      for (int64_t r = r0; r < r1; ++r) h_[r] = 0.5f * g_[r] * (1.0f + std::erf(g_[r] * 0.70710678118654752f));
    } else if (isa_ == EI_AVX512) {
      silu_mul_avx512(g_.data(), u_.data(), h_.data(), r0, r1);
    } else {
      for (int64_t r = r0; r < r1; ++r) h_[r] = g_[r] / (1.0f + std::exp(-g_[r])) * u_[r];
    }
  }

  // ----- one token, executed by every thread of the team
  void run(int tid, int T, int64_t token, int64_t pos, float* logits) {
    Plan& p = plans_.find(T)->second;
    float* xn = xn_[tid].data();
    const bool prof = profile_ && tid == 0;
    auto clock = [] { return std::chrono::steady_clock::now(); };
    auto t_last = clock();
    auto mark = [&](int slot) {
      if (!prof) return;
      const auto now = clock();
      prof_[slot] += std::chrono::duration<double>(now - t_last).count();
      t_last = now;
    };
    if (tid == 0)
      for (int64_t i = 0; i < D_; ++i) x_[i] = load_value(embed_, embed_vt_, token * D_ + i);
    barrier_.wait(T);
    mark(P_EMBED);
    const int64_t q = nh_ * hd_, kv = nkv_ * hd_;
    const int64_t rep = nh_ / nkv_;
    const int64_t S = pos + 1;
    for (int64_t l = 0; l < L_; ++l) {
      // norm + q/k/v
      norm_into(x_.data(), int(4 * l), xn);
      run_tasks(p.qkv[l].per_thread[tid], prepare(p.qkv[l], xn, D_, tid), qkv_.data(), false);
      barrier_.wait(T);
      mark(P_QKV);
      // RoPE; k and v into the cache at `pos`
      for (int64_t i = p.rope_items[tid].first; i < p.rope_items[tid].second; ++i) {
        if (i < nh_) {
          rope(qkv_.data() + i * hd_, pos);
        } else {
          const int64_t g = i - nh_;
          float* kr = qkv_.data() + q + g * hd_;
          const float* vr = qkv_.data() + q + kv + g * hd_;
          rope(kr, pos);
          const int64_t off = (g * max_len_ + pos) * hd_;
          for (int64_t c = 0; c < hd_; ++c) {
            store_value(kc_[l], cache_vt_, off + c, kr[c]);
            store_value(vc_[l], cache_vt_, off + c, vr[c]);
          }
        }
      }
      (void)rep;
      barrier_.wait(T);
      mark(P_ROPE);
      for (int64_t h = p.heads[tid].first; h < p.heads[tid].second; ++h)
        attend(l, h, S, scores_[tid].data(), att_.data() + h * hd_);
      barrier_.wait(T);
      mark(P_ATTN);
      // x += o(att)
      const float* ain = att_.data();
      run_tasks(p.o[l].per_thread[tid], prepare(p.o[l], ain, q, tid), x_.data(), true);
      barrier_.wait(T);
      mark(P_O);
      // norm + gate/up + activation
      norm_into(x_.data(), int(4 * l + 2), xn);
      const Input gin = prepare(p.gu[l], xn, D_, tid);
      for (const Task& t : p.gu[l].per_thread[tid]) {
        const bool is_up = !gelu_ && t.mat == int(l * per_layer_ + 5);
        run_task(t, gin, is_up ? u_.data() : g_.data(), false);
      }
      activation(p.gu[l].act_range[tid].first, p.gu[l].act_range[tid].second);
      barrier_.wait(T);
      mark(P_GATEUP);
      // x += down(h)
      run_tasks(p.down[l].per_thread[tid], prepare(p.down[l], h_.data(), F_, tid), x_.data(), true);
      barrier_.wait(T);
      mark(P_DOWN);
    }
    norm_into(x_.data(), int(4 * L_), xn);
    run_tasks(p.head.per_thread[tid], prepare(p.head, xn, D_, tid), logits, false);
    if (prof) {
      barrier_.wait(T);
      mark(P_HEAD);
      ++prof_steps_;
    } else {
      barrier_.wait(T);
    }
  }

  // shape
  int64_t L_ = 0, D_ = 0, nh_ = 0, nkv_ = 0, hd_ = 0, F_ = 0, V_ = 0, pad_ = 0;
  int per_layer_ = 7;
  bool layernorm_ = false, gelu_ = false;
  float eps_ = 1e-5f;
  int isa_ = EI_SCALAR;
  bool bf16_dot_ = false;
  int64_t total_bytes_ = 0, min_thread_bytes_ = int64_t(1) << 20;
  // weights (views of the model's tensors, kept alive)
  std::vector<at::Tensor> keep_;
  const void* embed_ = nullptr;
  int embed_vt_ = VT_F32;
  std::vector<const void*> norm_p_;
  std::vector<int> norm_vt_;
  std::vector<Mat> mats_;
  // cache
  std::vector<at::Tensor> cache_keep_;
  std::vector<void*> kc_, vc_;
  int cache_vt_ = VT_F32;
  int64_t max_len_ = 0;
  const float* cos_ = nullptr;
  const float* sin_ = nullptr;
  // activations
  std::vector<float> x_, qkv_, att_, g_, u_, h_;
  std::vector<std::vector<float>> xn_, scores_;
  std::vector<std::vector<uint16_t>> xb_;
  std::vector<std::vector<float>> xs_;
  std::vector<std::vector<uint8_t>> xq_;
  std::vector<std::vector<float>> xsc_;
  std::map<int, Plan> plans_;
  SpinBarrier barrier_;
  // profile
  bool profile_ = false;
  double prof_[P_SLOTS] = {0};
  int64_t prof_steps_ = 0;
};

}  // namespace

void register_decode_engine(pybind11::module& m) {
  pybind11::class_<DecodeEngine>(m, "DecodeEngine",
                                 "Batch-1 decode of a whole decoder in C++ (see ipu_sparse/sparse/engine.py)")
      .def(pybind11::init<std::vector<int64_t>, double, at::Tensor, std::vector<c10::optional<at::Tensor>>,
                          std::vector<std::tuple<std::string, int64_t, int64_t, std::vector<at::Tensor>,
                                                 c10::optional<at::Tensor>>>,
                          const std::string&, bool>(),
           pybind11::arg("config"), pybind11::arg("eps"), pybind11::arg("embed"), pybind11::arg("norms"),
           pybind11::arg("mats"), pybind11::arg("isa") = "auto", pybind11::arg("bf16_dot") = false)
      .def("bind_cache", &DecodeEngine::bind_cache, pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("cos"),
           pybind11::arg("sin"))
      .def("step", &DecodeEngine::step, pybind11::arg("token"), pybind11::arg("pos"),
           pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("set_profile", &DecodeEngine::set_profile)
      .def("set_min_thread_bytes", &DecodeEngine::set_min_thread_bytes)
      .def("set_int8_dot", &DecodeEngine::set_int8_dot)
      .def("profile", &DecodeEngine::profile)
      .def("isa", &DecodeEngine::isa_name);
}
