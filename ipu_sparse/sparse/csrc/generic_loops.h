// Generic row loops of the sparse kernels, included once per code path (see sparse_kernels.cpp):
// each inclusion sits in its own namespace under `#pragma GCC target`, so the compiler
// vectorises the same source for that ISA (and uses F16C for fp16 where it may).
// Expects F32/BF16/F16, load_bits and to_f32_bf16 from the including file.

inline __attribute__((always_inline)) float cvt(float v, F32) { return v; }
inline __attribute__((always_inline)) float cvt(uint16_t v, BF16) { return to_f32(v, BF16()); }
inline __attribute__((always_inline)) float cvt(uint16_t v, F16) {
#ifdef __F16C__
  return _cvtsh_ss(v);
#else
  return to_f32(v, F16());
#endif
}
inline __attribute__((always_inline)) float cvt(int8_t v, I8) { return float(v); }

// Dense int8 rows (q8_matmul): y[b, r] = sum_g scales[r, g] * sum_{j in group g} q[r, j] x[b, j] + bias[r].
__attribute__((noinline)) void q8_gemv(const float* x, int64_t B, const int8_t* q, const float* scales, int64_t cols,
                                       int64_t groups, const float* bias, float* y, int64_t rows, int64_t r0,
                                       int64_t r1) {
  const int64_t gs = cols / groups;
  for (int64_t r = r0; r < r1; ++r) {
    const int8_t* w = q + r * cols;
    const float* s = scales + r * groups;
    for (int64_t b = 0; b < B; ++b) {
      const float* xb = x + b * cols;
      float acc = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        float t = 0.f;
        for (int64_t j = g * gs; j < (g + 1) * gs; ++j) t += float(w[j]) * xb[j];
        acc += s[g] * t;
      }
      y[b * rows + r] = acc + (bias ? bias[r] : 0.f);
    }
  }
}


// Batch 1, bitmap: y[r] = sum over set bits.
template <typename V>
__attribute__((noinline)) void bitmap_gemv(
    const float* x, const uint8_t* mask, int64_t row_bytes, const int32_t* row_ptr, const typename V::T* vals,
    const float* bias, float* y, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* m = mask + r * row_bytes;
    const typename V::T* p = vals + row_ptr[r];
    float acc = 0.f;
    for (int64_t b = 0; b < row_bytes; b += 8) {
      uint64_t w = load_bits(m + b, row_bytes - b);
      while (w) {
        int t = __builtin_ctzll(w);
        acc += cvt(*p++, V()) * x[b * 8 + t];
        w &= w - 1;
      }
    }
    y[r] = acc + (bias ? bias[r] : 0.f);
  }
}

template <typename V>
__attribute__((noinline)) void csr_gemv(
    const float* x, const int32_t* row_ptr, const uint16_t* col, const typename V::T* vals, const float* bias,
    float* y, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    float acc = 0.f;
    for (int32_t k = row_ptr[r]; k < row_ptr[r + 1]; ++k) acc += cvt(vals[k], V()) * x[col[k]];
    y[r] = acc + (bias ? bias[r] : 0.f);
  }
}

// Batch BC (x transposed to xt (cols, BC)): acc[0:BC] += v * xt[col, 0:BC] per non-zero.
// acc is a GCC vector of BC floats, lowered to whatever registers the caller's target has.
template <int BC>
struct VecF {
  typedef float type __attribute__((vector_size(BC * sizeof(float))));
};

template <int BC>
inline __attribute__((always_inline)) typename VecF<BC>::type load_vec(const float* p) {
  typename VecF<BC>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <int BC>
inline __attribute__((always_inline)) void store_rows(const typename VecF<BC>::type& acc, const float* bias, int64_t r,
                                                      float* y, int64_t ldy, int64_t nb) {
  float out[BC];
  std::memcpy(out, &acc, sizeof(out));
  const float bv = bias ? bias[r] : 0.f;
  for (int64_t j = 0; j < nb; ++j) y[j * ldy + r] = out[j] + bv;
}

template <int BC, typename V>
__attribute__((noinline)) void bitmap_spmm(
    const float* xt, const uint8_t* mask, int64_t row_bytes, const int32_t* row_ptr, const typename V::T* vals,
    const float* bias, float* y, int64_t ldy, int64_t nb, int64_t r0, int64_t r1) {
  typedef typename VecF<BC>::type vec;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* m = mask + r * row_bytes;
    const typename V::T* p = vals + row_ptr[r];
    vec acc = {};
    for (int64_t b = 0; b < row_bytes; b += 8) {
      uint64_t w = load_bits(m + b, row_bytes - b);
      while (w) {
        const int t = __builtin_ctzll(w);
        const float v = cvt(*p++, V());
        acc += v * load_vec<BC>(xt + (b * 8 + t) * BC);
        w &= w - 1;
      }
    }
    store_rows<BC>(acc, bias, r, y, ldy, nb);
  }
}

template <int BC, typename V>
__attribute__((noinline)) void csr_spmm(
    const float* xt, const int32_t* row_ptr, const uint16_t* col, const typename V::T* vals, const float* bias,
    float* y, int64_t ldy, int64_t nb, int64_t r0, int64_t r1) {
  typedef typename VecF<BC>::type vec;
  for (int64_t r = r0; r < r1; ++r) {
    vec acc = {};
    const int64_t end = row_ptr[r + 1];
    for (int64_t k = row_ptr[r]; k < end; ++k) {
      const float v = cvt(vals[k], V());
      acc += v * load_vec<BC>(xt + int64_t(col[k]) * BC);
    }
    store_rows<BC>(acc, bias, r, y, ldy, nb);
  }
}

