"""C++ source of the fused CPU kernels (compiled at first use by ``_build.py``).

Layout and algorithm
--------------------
Every problem is viewed as 3-D ``(z, y, x)`` (1-D/2-D inputs get leading dims of size 1,
kernel 1). One task is one ``(batch, kv_head)`` pair, or a block of its rows when there are
few pairs (1-D: a block of SIMD tiles; the split depends only on the shape, never on the
thread count). A task works through its block in *sub-blocks* of a few thousand query
tokens (at least 8 neighborhood reaches; the size comes from the Python side), and copies
the keys, values and queries (all query heads of the GQA group) a sub-block needs into
thread-local *transposed slabs* ``[head_dim][tokens]`` so that ``VL`` consecutive tokens
along ``x`` are one SIMD vector; inputs may be strided views. A slab holds only the
sub-block's token range and its neighbors' (indices relative to the range's first token),
so scratch memory is bounded by the sub-block size, not the grid's.

SIMD runs over ``VL`` queries of one row (16 with AVX-512, 8 otherwise; GCC vector
extensions, so the same code compiles for any ISA). Queries of one row share their ``z``
and ``y`` windows; along ``x`` a tile is *contiguous* when the lanes' windows start at
consecutive keys (the interior of every row when stride is 1): then the ``t``-th key of
every lane is one unaligned vector load. Other tiles (borders, stride > 1, causal starts)
gather per lane. Scores exist only for a chunk of at most 8 keys per lane, in registers,
merged by an online softmax in base 2 (the query slab is pre-scaled by
``scale * log2(e)``, the bias table by ``log2(e)``).

Backward (FlashAttention-2 style, no atomics): a *query pass* per query tile recomputes
the probabilities from the saved log-sum-exp and accumulates dQ, the bias gradient and the
extra-token gradients; a *key pass* per key tile walks the queries that attend those keys
(the inverse neighborhood is separable per dimension and an interval per dilation group)
and accumulates dK and dV in registers. Both passes only read shared data; every output
element is written by one task (bias and extra-token gradients as per-task partials summed
afterwards in a fixed order), so results do not depend on the thread count.
"""

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__AVX512F__)
#define NK_VL 16
#else
#define NK_VL 8
#endif
constexpr int VL = NK_VL;
constexpr int CH = 8;            // keys per chunk (scores of a chunk live in registers)
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;
constexpr float NEG = -1e30f;    // finite "minus infinity" for running maxima

typedef float vf __attribute__((vector_size(VL * 4)));
typedef float vfu __attribute__((vector_size(VL * 4), aligned(4)));
typedef int vi __attribute__((vector_size(VL * 4)));

static inline vf ld(const float* p) { return *reinterpret_cast<const vfu*>(p); }
static inline void st(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
static inline vf splat(float x) { vf r; for (int l = 0; l < VL; ++l) r[l] = x; return r; }
static inline vi splati(int x) { vi r; for (int l = 0; l < VL; ++l) r[l] = x; return r; }
static inline vf vmax(vf a, vf b) { return a > b ? a : b; }
static inline float hsum(vf v) { float s = 0.f; for (int l = 0; l < VL; ++l) s += v[l]; return s; }
static inline vf gather(const float* base, const vi& idx) {
  vf r; for (int l = 0; l < VL; ++l) r[l] = base[idx[l]]; return r;
}

// Where the keys (or queries) of chunk entry j are, per lane. MODE 0: contiguous at
// off + j*step; 1: gathered at idx[j]; 2: one token for every lane at off + j*step;
// 3/4: a permutation `perm` of the one/two vectors at off + j*step (borders, stride, causal).
struct Src { int off, step; const vi* idx; vi perm; };

template <int MODE>
static inline vf load(const float* base, const Src& s, int j) {
  const float* p = base + s.off + j * s.step;
  if constexpr (MODE == 0) return ld(p);
  else if constexpr (MODE == 1) return gather(base, s.idx[j]);
  else if constexpr (MODE == 2) return splat(*p);
#if defined(__clang__)
  else { vf r; for (int l = 0; l < VL; ++l) r[l] = p[s.perm[l]]; return r; }
#else
  else if constexpr (MODE == 3) return __builtin_shuffle(ld(p), s.perm);
  else return __builtin_shuffle(ld(p), ld(p + VL), s.perm);
#endif
}

// 2^x for x <= 126 (x < -126, including -inf, gives exactly 0); relative error ~2e-7.
static inline vf vexp2(vf x) {
  vi dead = x < splat(-126.f);
  x = dead ? splat(-126.f) : x;
  x = x > splat(126.f) ? splat(126.f) : x;
  vf xr = x + splat(0.5f);
  vi n = __builtin_convertvector(xr, vi);
  vf nf = __builtin_convertvector(n, vf);
  n = nf > xr ? n - splati(1) : n;                 // floor(x + 0.5)
  vf f = x - __builtin_convertvector(n, vf);        // in [-0.5, 0.5]
  vf p = splat(1.5252733e-5f);
  p = p * f + splat(1.5403530e-4f);
  p = p * f + splat(1.3333558e-3f);
  p = p * f + splat(9.6181291e-3f);
  p = p * f + splat(5.5504109e-2f);
  p = p * f + splat(2.4022651e-1f);
  p = p * f + splat(6.9314718e-1f);
  p = p * f + splat(1.0f);
  vi bits = (vi)p + (n << 23);
  return (vf)(bits & ~dead);
}

struct Dim {
  int L, K, dil, R;              // R = 2K - 1 (bias table extent)
  const int *start, *count, *pos, *qlo, *qcnt;
};

// Visits the key rows (kz, ky) of the neighborhood of query row (z, y): f(rowoff, rbias) gets
// the token index of the row's x = 0 and the offset of its relative-bias row, where
// rz = (kz div d) - (z div d) + K - 1 (likewise ry) index the [2K-1]^3 table.
template <class F>
inline void for_key_rows(const Dim& Z, const Dim& Y, const Dim& X, int z, int y, F&& f) {
  for (int tz = 0; tz < Z.count[z]; ++tz) {
    const int kz = Z.start[z] + tz * Z.dil;
    const int rz = kz / Z.dil - Z.pos[z] + Z.K - 1;
    for (int ty = 0; ty < Y.count[y]; ++ty) {
      const int ky = Y.start[y] + ty * Y.dil;
      const int ry = ky / Y.dil - Y.pos[y] + Y.K - 1;
      f((kz * Y.L + ky) * X.L, (rz * Y.R + ry) * X.R);
    }
  }
}

struct Prob {
  int B, H, Hk, G, D, E, N;      // G = H / Hk
  int M;                         // zeroed margin after a slab's tokens (masked lanes read it)
  int sub;                       // query tokens per sub-block (rounded to rows / SIMD tiles)
  Dim dim[3];
  int Rt;                        // bias table entries per head
  const float* rpb;              // [H, Rt], pre-scaled by log2(e); null without bias
  int64_t st[9];                 // (batch, token, head) strides of q, k, v
};

// geo = [B, Lz, Ly, Lx, H, Hk, D, (batch, token, head) strides of q, k, v, sub-block tokens]:
// inputs may be strided views (e.g. q, k, v unbound from one qkv projection) as long as
// head_dim is contiguous and the spatial dims flatten with one token stride.
static Prob make_prob(const std::vector<int64_t>& geo,
                      const std::vector<torch::Tensor>& tables, std::vector<int64_t> kd,
                      const torch::Tensor& rpb, int64_t E) {
  Prob p;
  p.B = geo[0]; p.H = geo[4]; p.Hk = geo[5]; p.G = p.H / p.Hk; p.D = geo[6];
  for (int i = 0; i < 9; ++i) p.st[i] = geo[7 + i];
  p.E = (int)E;
  p.N = geo[1] * geo[2] * geo[3];
  p.M = 4 * VL + 3 * (int)(kd[4] * kd[5]);
  p.sub = (int)std::max<int64_t>(1, geo[16]);
  for (int i = 0; i < 3; ++i) {
    Dim& d = p.dim[i];
    d.L = geo[1 + i]; d.K = kd[2 * i]; d.dil = kd[2 * i + 1]; d.R = 2 * d.K - 1;
    const torch::Tensor& t = tables[i];   // int32 [5, L]
    const int* b = t.data_ptr<int>();
    d.start = b; d.count = b + d.L; d.pos = b + 2 * d.L; d.qlo = b + 3 * d.L; d.qcnt = b + 4 * d.L;
  }
  p.Rt = p.dim[0].R * p.dim[1].R * p.dim[2].R;
  p.rpb = rpb.defined() ? rpb.data_ptr<float>() : nullptr;
  return p;
}

// Thread-local scratch that grows and is reused across calls (no allocation per call).
// Contents are not kept: growing reallocates exactly n floats (no copy, no doubling).
static float* scratch(std::vector<float>& buf, size_t n) {
  if (buf.size() < n) { std::vector<float>().swap(buf); buf.resize(n); }
  return buf.data();
}

// In-register transpose of a VL x VL tile (r[i][p] <- r[p][i]) by log2(VL) butterfly stages.
static inline void transpose_tile(vf* r) {
#if defined(__clang__)
  float t[VL][VL];
  for (int i = 0; i < VL; ++i) for (int p = 0; p < VL; ++p) t[p][i] = r[i][p];
  for (int i = 0; i < VL; ++i) r[i] = ld(t[i]);
#else
  for (int h = VL / 2; h >= 1; h /= 2) {
    vi lo, hi;
    for (int p = 0; p < VL; ++p) {
      lo[p] = (p & h) ? p - h + VL : p;
      hi[p] = (p & h) ? p + VL : p + h;
    }
    for (int i = 0; i < VL; ++i) {
      if (i & h) continue;
      vf a = r[i], b = r[i + h];
      r[i] = __builtin_shuffle(a, b, lo);
      r[i + h] = __builtin_shuffle(a, b, hi);
    }
  }
#endif
}

// Tokens [lo, hi) of src [N, tok_stride] (head_dim contiguous) -> dst [D][NP] at token
// n - base (scaled). The M entries after hi are zeroed: loads of masked lanes may run past
// the last needed token. The caller's NP is at least hi - base + M.
static void to_slab(const float* src, int64_t tok_stride, int lo, int hi, int base, int M,
                    int D, int NP, float mul, float* dst) {
  if (hi <= lo) return;
  const vf vm = splat(mul);
  src += (int64_t)base * tok_stride;
  lo -= base; hi -= base;
  int n0 = lo;
  for (; n0 + VL <= hi; n0 += VL) {
    const float* s = src + (int64_t)n0 * tok_stride;
    int d0 = 0;
    for (; d0 + VL <= D; d0 += VL) {
      vf r[VL];
      for (int l = 0; l < VL; ++l) r[l] = ld(s + l * tok_stride + d0);
      transpose_tile(r);
      for (int i = 0; i < VL; ++i) st(dst + (size_t)(d0 + i) * NP + n0, r[i] * vm);
    }
    for (; d0 < D; ++d0)
      for (int l = 0; l < VL; ++l) dst[(size_t)d0 * NP + n0 + l] = s[l * tok_stride + d0] * mul;
  }
  for (; n0 < hi; ++n0)
    for (int d = 0; d < D; ++d) dst[(size_t)d * NP + n0] = src[(int64_t)n0 * tok_stride + d] * mul;
  for (int d = 0; d < D; ++d) std::fill(dst + (size_t)d * NP + hi, dst + (size_t)d * NP + hi + M, 0.f);
}

// A task's share of one (batch, kv_head): rows [ra, rb) of the flattened (z, y) rows and,
// along x, [xa, xb) (whole rows unless the problem has a single row, i.e. 1-D).
struct Block { int ra, rb, xa, xb; };

static Block block_of(const Prob& p, int blk, int nblk) {
  const int rows = p.dim[0].L * p.dim[1].L, X = p.dim[2].L;
  if (rows > 1) return {int((int64_t)rows * blk / nblk), int((int64_t)rows * (blk + 1) / nblk), 0, X};
  const int tiles = (X + VL - 1) / VL;
  const int ta = int((int64_t)tiles * blk / nblk), tb = int((int64_t)tiles * (blk + 1) / nblk);
  return {0, 1, ta * VL, std::min(tb * VL, X)};
}

// Flattened token range [lo, hi) covering the keys that the block's queries attend
// (inverse = false), or the queries attending the block's keys (inverse = true).
static void touched(const Prob& p, const Block& bl, bool inverse, int& lo, int& hi) {
  const Dim &Z = p.dim[0], &Y = p.dim[1], &X = p.dim[2];
  const int za = bl.ra / Y.L, zb = (bl.rb - 1) / Y.L;
  const int ya = za == zb ? bl.ra % Y.L : 0, yb = za == zb ? (bl.rb - 1) % Y.L : Y.L - 1;
  int mn[3], mx[3];
  const int a[3] = {za, ya, bl.xa}, b[3] = {zb, yb, bl.xb - 1};
  for (int i = 0; i < 3; ++i) {
    const Dim& D = p.dim[i];
    mn[i] = D.L; mx[i] = -1;
    for (int c = a[i]; c <= b[i]; ++c) {
      const int f = inverse ? D.qlo[c] : D.start[c], n = inverse ? D.qcnt[c] : D.count[c];
      if (n > 0) { mn[i] = std::min(mn[i], f); mx[i] = std::max(mx[i], f + (n - 1) * D.dil); }
    }
    if (mx[i] < 0) { lo = hi = 0; return; }
  }
  lo = (mn[0] * Y.L + mn[1]) * X.L + mn[2];
  hi = (mx[0] * Y.L + mx[1]) * X.L + mx[2] + 1;
}

static inline int block_lo(const Prob& p, const Block& bl) { return bl.ra * p.dim[2].L + bl.xa; }
static inline int block_hi(const Prob& p, const Block& bl) { return (bl.rb - 1) * p.dim[2].L + bl.xb; }

// Calls f(sub_block) for the block's sub-blocks in order: runs of rows (1-D: of SIMD tiles)
// of about p.sub query tokens.
template <class F>
static void for_sub_blocks(const Prob& p, const Block& bl, F&& f) {
  const int X = p.dim[2].L;
  if (p.dim[0].L * p.dim[1].L > 1) {
    const int step = std::max(1, p.sub / X);
    for (int r = bl.ra; r < bl.rb; r += step) f(Block{r, std::min(r + step, bl.rb), 0, X});
  } else {
    const int step = std::max(1, p.sub / VL) * VL;
    for (int x = bl.xa; x < bl.xb; x += step) f(Block{0, 1, x, std::min(x + step, bl.xb)});
  }
}

// Per-lane description of a row tile along x: where each lane's keys start and how many.
struct Lanes {
  int nv;             // valid lanes
  bool contig;        // lane l's t-th key is lane 0's t-th key + l
  int tmax;           // most keys per lane along x
  int first[VL], cnt[VL], rb[VL];  // first key, count, bias base (x part)
  bool rb_uniform;
  bool full;          // every lane has tmax entries (no masking needed)
  int mode, base;     // load mode of the tile and its lane-0 base (see Src)
  vi perm;
};

static void finish_lanes(Lanes& ln) {
  ln.full = true;
  int lo = ln.first[0], hi = ln.first[0];
  for (int l = 0; l < ln.nv; ++l) {
    ln.full &= ln.cnt[l] == ln.tmax;
    lo = std::min(lo, ln.first[l]); hi = std::max(hi, ln.first[l]);
  }
  if (ln.contig) { ln.mode = 0; ln.base = ln.first[0]; return; }
  ln.base = lo;
  for (int l = 0; l < VL; ++l) ln.perm[l] = ln.first[l] - lo;
  ln.mode = hi - lo < VL ? 3 : hi - lo < 2 * VL ? 4 : 1;
}

// Query tile of the forward / query pass: windows of queries x0 .. x0+nv-1.
static void query_lanes(const Dim& X, int x0, Lanes& ln) {
  ln.nv = std::min(VL, X.L - x0);
  ln.contig = true; ln.tmax = 0; ln.rb_uniform = true;
  for (int l = 0; l < VL; ++l) {
    int x = x0 + std::min(l, ln.nv - 1);
    ln.first[l] = X.start[x]; ln.cnt[l] = X.count[x];
    ln.rb[l] = X.start[x] / X.dil - X.pos[x] + X.K - 1;
    if (l < ln.nv) {
      ln.tmax = std::max(ln.tmax, ln.cnt[l]);
      if (ln.first[l] != ln.first[0] + l || ln.cnt[l] != X.K) ln.contig = false;
      if (ln.rb[l] != ln.rb[0]) ln.rb_uniform = false;
    }
  }
  finish_lanes(ln);
}

// Calls f(g, h, z, y, n0, lanes) for every SIMD query tile of a (sub-)block, head by head
// of the GQA group (g; h = hk * G + g); n0 is the tile's first token.
template <class F>
static void for_query_tiles(const Prob& p, int hk, const Block& bl, F&& f) {
  const Dim &Y = p.dim[1], &X = p.dim[2];
  for (int g = 0; g < p.G; ++g)
    for (int row = bl.ra; row < bl.rb; ++row)
      for (int x0 = bl.xa; x0 < bl.xb; x0 += VL) {
        const int z = row / Y.L, y = row % Y.L;
        Lanes ln; query_lanes(X, x0, ln);
        f(g, hk * p.G + g, z, y, (z * Y.L + y) * X.L + x0, ln);
      }
}

// Key tile of the key pass: the queries attending keys x0 .. x0+nv-1.
static void key_lanes(const Dim& X, int x0, Lanes& ln) {
  ln.nv = std::min(VL, X.L - x0);
  ln.contig = true; ln.tmax = 0; ln.rb_uniform = true;
  int c0 = X.qcnt[x0];
  for (int l = 0; l < VL; ++l) {
    int x = x0 + std::min(l, ln.nv - 1);
    ln.first[l] = X.qlo[x]; ln.cnt[l] = X.qcnt[x];
    // bias x index for query offset u: (x div d) - (qlo div d) - u + K - 1
    ln.rb[l] = x / X.dil - X.qlo[x] / X.dil + X.K - 1;
    if (l < ln.nv) {
      ln.tmax = std::max(ln.tmax, ln.cnt[l]);
      if (ln.first[l] != ln.first[0] + l || ln.cnt[l] != c0) ln.contig = false;
      if (ln.rb[l] != ln.rb[0]) ln.rb_uniform = false;
    }
  }
  finish_lanes(ln);
}

// Indices and validity of chunk entries t0 .. t0+NJ-1 in gather mode (clamped in range).
template <int NJ>
static inline void gather_idx(const Lanes& ln, int rowoff, int dil, int t0, vi* idx, vi* ok) {
  for (int j = 0; j < NJ; ++j)
    for (int l = 0; l < VL; ++l) {
      int t = t0 + j;
      int c = ln.cnt[l];
      ok[j][l] = t < c ? -1 : 0;
      int tc = std::max(0, std::min(t, c - 1));
      idx[j][l] = rowoff + ln.first[l] + tc * dil;
    }
}

template <int NJ>
static inline void chunk_mask(const Lanes& ln, int t0, vi* ok) {
  for (int j = 0; j < NJ; ++j)
    for (int l = 0; l < VL; ++l) ok[j][l] = t0 + j < ln.cnt[l] ? -1 : 0;
}

// Bias of chunk entries (x index rb[l] + sgn * (t0 + j)) from one bias row. Masked entries
// of lanes with fewer keys (or queries) than the chunk's longest run past their row's
// start in the key pass (sgn = -1): their index is clamped (the value is masked anyway).
template <int NJ>
static inline void bias_chunk(const Lanes& ln, const float* row, int t0, int sgn, vf* bias) {
  for (int j = 0; j < NJ; ++j) {
    if (ln.rb_uniform) bias[j] = splat(row[ln.rb[0] + sgn * (t0 + j)]);
    else for (int l = 0; l < VL; ++l) bias[j][l] = row[std::max(0, ln.rb[l] + sgn * (t0 + j))];
  }
}

// ---------------------------------------------------------------------------------------
// Forward: one chunk of NJ keys for one query tile; scores stay in registers.
template <int NJ, int MODE>
static inline void fwd_chunk(const float* Q, int NP, const float* Kb, const float* Vb, int kds,
                             const Src& src, const vi* ok, const vf* bias,
                             int D, vf& m, vf& lsum, float* O) {
  vf s[NJ];
  for (int j = 0; j < NJ; ++j) s[j] = splat(0.f);
  for (int d = 0; d < D; ++d) {
    vf qd = ld(Q + (size_t)d * NP);
    const float* kd = Kb + (size_t)d * kds;
    for (int j = 0; j < NJ; ++j) s[j] += qd * load<MODE>(kd, src, j);
  }
  if (bias) for (int j = 0; j < NJ; ++j) s[j] += bias[j];
  if (ok) for (int j = 0; j < NJ; ++j) s[j] = ok[j] ? s[j] : splat(-INFINITY);
  vf mx = m;
  for (int j = 0; j < NJ; ++j) mx = vmax(mx, s[j]);
  vf alpha = vexp2(m - mx);
  lsum *= alpha;
  for (int j = 0; j < NJ; ++j) { s[j] = vexp2(s[j] - mx); lsum += s[j]; }
  bool rescale = false;
  for (int l = 0; l < VL; ++l) rescale |= alpha[l] != 1.f;
  for (int d = 0; d < D; ++d) {
    vf o = ld(O + d * VL);
    if (rescale) o *= alpha;
    const float* vd = Vb + (size_t)d * kds;
    for (int j = 0; j < NJ; ++j) o += s[j] * load<MODE>(vd, src, j);
    st(O + d * VL, o);
  }
  m = mx;
}

// ---------------------------------------------------------------------------------------
// Query pass of the backward: probabilities from the saved lse, dQ (+ bias / extra grads).
struct QPass {
  const float *Q, *dO;          // tile pointers into the slabs (lane 0)
  int NP, D;
  vf lse2, delta;               // per lane; invalid lanes have lse2 = +big (P = 0)
  float* dQ;                    // [D][VL] accumulator (unscaled: dS . K)
  float* drpb_row;              // bias-gradient row (x part added per entry) or null
  const Lanes* ln;
  float* dek; float* dev;       // extra tokens: [E][D][VL] accumulators (MODE 2)
};

template <int NJ, int MODE>
static inline void qpass_chunk(QPass& c, const float* Kb, const float* Vb, int kds, const Src& src,
                               const vi* ok, const vf* bias, int t0, int e0) {
  const int D = c.D, NP = c.NP;
  vf s[NJ], dp[NJ];
  for (int j = 0; j < NJ; ++j) { s[j] = splat(0.f); dp[j] = splat(0.f); }
  for (int d = 0; d < D; ++d) {
    vf qd = ld(c.Q + (size_t)d * NP), gd = ld(c.dO + (size_t)d * NP);
    const float* kd = Kb + (size_t)d * kds;
    const float* vd = Vb + (size_t)d * kds;
    for (int j = 0; j < NJ; ++j) {
      s[j] += qd * load<MODE>(kd, src, j);
      dp[j] += gd * load<MODE>(vd, src, j);
    }
  }
  if (bias) for (int j = 0; j < NJ; ++j) s[j] += bias[j];
  if (ok) for (int j = 0; j < NJ; ++j) s[j] = ok[j] ? s[j] : splat(-INFINITY);
  vf p[NJ], ds[NJ];
  for (int j = 0; j < NJ; ++j) { p[j] = vexp2(s[j] - c.lse2); ds[j] = p[j] * (dp[j] - c.delta); }
  for (int d = 0; d < D; ++d) {
    vf acc = ld(c.dQ + d * VL);
    const float* kd = Kb + (size_t)d * kds;
    for (int j = 0; j < NJ; ++j) acc += ds[j] * load<MODE>(kd, src, j);
    st(c.dQ + d * VL, acc);
  }
  if (c.drpb_row && MODE != 2) {
    const Lanes& ln = *c.ln;
    for (int j = 0; j < NJ; ++j) {
      if (ln.rb_uniform) c.drpb_row[ln.rb[0] + t0 + j] += hsum(ds[j]);
      else for (int l = 0; l < VL; ++l) c.drpb_row[ln.rb[l] + t0 + j] += ds[j][l];
    }
  }
  if (MODE == 2) {
    for (int j = 0; j < NJ; ++j) {
      float* ek = c.dek + (size_t)(e0 + j) * D * VL;
      float* ev = c.dev + (size_t)(e0 + j) * D * VL;
      for (int d = 0; d < D; ++d) {
        st(ek + d * VL, ld(ek + d * VL) + ds[j] * ld(c.Q + (size_t)d * NP));
        st(ev + d * VL, ld(ev + d * VL) + p[j] * ld(c.dO + (size_t)d * NP));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Key pass: lanes are keys; entries are the queries attending them.
struct KPass {
  const float *K, *V;            // key tile pointers into the K/V slabs (lane 0)
  const float *Q, *dO, *lse2, *delta;   // query slabs of the current head
  int NP, D;
  float *dK, *dV;                // [D][VL] accumulators
};

template <int NJ, int MODE>
static inline void kpass_chunk(KPass& c, const Src& src, const vi* ok, const vf* bias) {
  const int D = c.D, NP = c.NP;
  vf s[NJ], dp[NJ], l2[NJ], dl[NJ];
  for (int j = 0; j < NJ; ++j) {
    s[j] = splat(0.f); dp[j] = splat(0.f);
    l2[j] = load<MODE>(c.lse2, src, j);
    dl[j] = load<MODE>(c.delta, src, j);
  }
  for (int d = 0; d < D; ++d) {
    vf kd = ld(c.K + (size_t)d * NP), vd = ld(c.V + (size_t)d * NP);
    const float* qd = c.Q + (size_t)d * NP;
    const float* gd = c.dO + (size_t)d * NP;
    for (int j = 0; j < NJ; ++j) {
      s[j] += load<MODE>(qd, src, j) * kd;
      dp[j] += load<MODE>(gd, src, j) * vd;
    }
  }
  if (bias) for (int j = 0; j < NJ; ++j) s[j] += bias[j];
  if (ok) for (int j = 0; j < NJ; ++j) s[j] = ok[j] ? s[j] : splat(-INFINITY);
  vf p[NJ], ds[NJ];
  for (int j = 0; j < NJ; ++j) { p[j] = vexp2(s[j] - l2[j]); ds[j] = p[j] * (dp[j] - dl[j]); }
  for (int d = 0; d < D; ++d) {
    vf ak = ld(c.dK + d * VL), av = ld(c.dV + d * VL);
    const float* qd = c.Q + (size_t)d * NP;
    const float* gd = c.dO + (size_t)d * NP;
    for (int j = 0; j < NJ; ++j) {
      ak += ds[j] * load<MODE>(qd, src, j);
      av += p[j] * load<MODE>(gd, src, j);
    }
    st(c.dK + d * VL, ak); st(c.dV + d * VL, av);
  }
}

// Runs `f.template operator()<NJ, MODE>(src, ok)` for entries t0 .. t0+nj-1 of a tile's
// row at `rowoff`, choosing the load mode of the tile.
template <typename F>
static inline void run_chunk(const Lanes& ln, int rowoff, int dil, int t0, int nj, F&& f);

template <int NJ, typename F>
static inline void run_chunk_nj(const Lanes& ln, int rowoff, int dil, int t0, F& f) {
  vi okv[NJ];
  const vi* ok = nullptr;
  if (!ln.full && ln.mode != 1) { chunk_mask<NJ>(ln, t0, okv); ok = okv; }
  Src src;
  src.step = dil; src.idx = nullptr; src.perm = ln.perm;
  src.off = rowoff + ln.base + t0 * dil;
  switch (ln.mode) {
    case 0: f.template operator()<NJ, 0>(src, ok); break;
    case 3: f.template operator()<NJ, 3>(src, ok); break;
    case 4: f.template operator()<NJ, 4>(src, ok); break;
    default: {
      vi idx[NJ];
      gather_idx<NJ>(ln, rowoff, dil, t0, idx, okv);
      src.off = 0; src.step = 0; src.idx = idx;
      f.template operator()<NJ, 1>(src, (const vi*)okv);
    }
  }
}

template <typename F>
static inline void run_chunk(const Lanes& ln, int rowoff, int dil, int t0, int nj, F&& f) {
  switch (nj) {
    case 1: run_chunk_nj<1>(ln, rowoff, dil, t0, f); break;
    case 2: run_chunk_nj<2>(ln, rowoff, dil, t0, f); break;
    case 3: run_chunk_nj<3>(ln, rowoff, dil, t0, f); break;
    case 4: run_chunk_nj<4>(ln, rowoff, dil, t0, f); break;
    case 5: run_chunk_nj<5>(ln, rowoff, dil, t0, f); break;
    case 6: run_chunk_nj<6>(ln, rowoff, dil, t0, f); break;
    case 7: run_chunk_nj<7>(ln, rowoff, dil, t0, f); break;
    default: run_chunk_nj<8>(ln, rowoff, dil, t0, f); break;
  }
}

// Calls F.template operator()<NJ>() for the runtime chunk size n (1..CH).
template <typename F>
static inline void dispatch_nj(int n, F&& f) {
  switch (n) {
    case 1: f.template operator()<1>(); break;
    case 2: f.template operator()<2>(); break;
    case 3: f.template operator()<3>(); break;
    case 4: f.template operator()<4>(); break;
    case 5: f.template operator()<5>(); break;
    case 6: f.template operator()<6>(); break;
    case 7: f.template operator()<7>(); break;
    default: f.template operator()<8>(); break;
  }
}

static thread_local std::vector<float> tl_k, tl_v, tl_q, tl_g, tl_ls, tl_dl, tl_acc, tl_ex;

// Scratch is kept between calls (no page faults per call) unless it grew very large.
static void trim_scratch() {
  constexpr size_t KEEP = (size_t)32 << 20;  // floats per buffer (128 MiB)
  for (auto* buf : {&tl_k, &tl_v, &tl_q, &tl_g, &tl_ls, &tl_dl, &tl_acc, &tl_ex})
    if (buf->capacity() > KEEP) std::vector<float>().swap(*buf);
}

// A thread's slabs for one sub-block: tokens [base, base + NP - M) as [D][NP] planes,
// token n at column n - base. Q (and, in the backward, dO, lse, delta) hold G heads.
struct Slabs {
  int base, NP;
  size_t plane;                  // D * NP
  const float *K, *V, *Q;
};

// Loads K and V tokens [klo, khi) and the Q tokens [qlo, qhi) of all G heads (scaled by
// qmul) of one (batch, kv_head) into the thread's slabs.
static Slabs load_slabs(const Prob& p, int b, int hk, const float* q, const float* k,
                        const float* v, float qmul, int klo, int khi, int qlo, int qhi) {
  Slabs s;
  s.base = khi > klo ? std::min(klo, qlo) : qlo;
  s.NP = std::max(khi, qhi) - s.base + p.M;
  s.plane = (size_t)p.D * s.NP;
  float* K = scratch(tl_k, s.plane);
  float* V = scratch(tl_v, s.plane);
  float* Q = scratch(tl_q, s.plane * p.G);
  const int64_t* st = p.st;
  to_slab(k + b * st[3] + hk * st[5], st[4], klo, khi, s.base, p.M, p.D, s.NP, 1.f, K);
  to_slab(v + b * st[6] + hk * st[8], st[7], klo, khi, s.base, p.M, p.D, s.NP, 1.f, V);
  for (int g = 0; g < p.G; ++g)
    to_slab(q + b * st[0] + (hk * p.G + g) * st[2], st[1], qlo, qhi, s.base, p.M, p.D, s.NP,
            qmul, Q + s.plane * g);
  s.K = K; s.V = V; s.Q = Q;
  return s;
}

static torch::Tensor opt(const std::optional<torch::Tensor>& t) { return t.has_value() ? *t : torch::Tensor(); }

std::vector<torch::Tensor> na_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                      std::optional<torch::Tensor> rpb_o, std::optional<torch::Tensor> ek_o,
                                      std::optional<torch::Tensor> ev_o,
                                      std::vector<torch::Tensor> tables, std::vector<int64_t> kd,
                                      double scale, int64_t nblk, std::vector<int64_t> geo) {
  torch::Tensor rpb = opt(rpb_o), ek = opt(ek_o), ev = opt(ev_o);
  const int64_t E = ek.defined() ? ek.size(1) : 0;
  Prob p = make_prob(geo, tables, kd, rpb, E);
  auto out = torch::empty({p.B, p.N, p.H, p.D}, q.options());
  auto lse = torch::empty({p.B, p.N, p.H}, q.options());
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float* ekp = E ? ek.data_ptr<float>() : nullptr;
  const float* evp = E ? ev.data_ptr<float>() : nullptr;
  float *op = out.data_ptr<float>(), *lp = lse.data_ptr<float>();
  const float qmul = (float)scale * LOG2E;
  {
  pybind11::gil_scoped_release nogil;
  at::parallel_for(0, (int64_t)p.B * p.Hk * nblk, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      const int blk = task % nblk, b = task / nblk / p.Hk, hk = task / nblk % p.Hk;
      float* O = scratch(tl_acc, (size_t)p.D * VL);
      const Dim &Z = p.dim[0], &Y = p.dim[1], &X = p.dim[2];
      const int64_t ex_tok = (int64_t)p.Hk * p.D;
      const float* ekb = E ? ekp + (int64_t)b * E * ex_tok + hk * p.D : nullptr;
      const float* evb = E ? evp + (int64_t)b * E * ex_tok + hk * p.D : nullptr;
      for_sub_blocks(p, block_of(p, blk, nblk), [&](const Block& bl) {
        int klo, khi;
        touched(p, bl, false, klo, khi);
        const Slabs s = load_slabs(p, b, hk, qp, kp, vp, qmul, klo, khi, block_lo(p, bl),
                                   block_hi(p, bl));
        for_query_tiles(p, hk, bl, [&](int g, int h, int z, int y, int n0, const Lanes& ln) {
          const float* Qt = s.Q + s.plane * g + (n0 - s.base);
          vf m = splat(NEG), lsum = splat(0.f);
          std::fill(O, O + (size_t)p.D * VL, 0.f);
          for_key_rows(Z, Y, X, z, y, [&](int rowoff, int rbias) {
            const float* brow = p.rpb ? p.rpb + (size_t)h * p.Rt + rbias : nullptr;
            for (int t0 = 0; t0 < ln.tmax; t0 += CH) {
              run_chunk(ln, rowoff - s.base, X.dil, t0, std::min(CH, ln.tmax - t0),
                        [&]<int NJ, int MODE>(const Src& src, const vi* ok) {
                vf bias[NJ];
                if (brow) bias_chunk<NJ>(ln, brow, t0, 1, bias);
                fwd_chunk<NJ, MODE>(Qt, s.NP, s.K, s.V, s.NP, src, ok, brow ? bias : nullptr,
                                    p.D, m, lsum, O);
              });
            }
          });
          for (int e0 = 0; e0 < E; e0 += CH) {
            const int nj = std::min<int>(CH, E - e0);
            Src src; src.off = e0 * ex_tok; src.step = ex_tok; src.idx = nullptr;
            dispatch_nj(nj, [&]<int NJ>() {
              fwd_chunk<NJ, 2>(Qt, s.NP, ekb, evb, 1, src, nullptr, nullptr, p.D, m, lsum, O);
            });
          }
          vf inv = splat(1.f) / lsum;
          for (int l = 0; l < ln.nv; ++l) {
            const int64_t n = (int64_t)b * p.N + n0 + l;
            float* o = op + (n * p.H + h) * p.D;
            for (int d = 0; d < p.D; ++d) o[d] = O[d * VL + l] * inv[l];
            lp[n * p.H + h] = (m[l] + std::log2(lsum[l])) * LN2;
          }
        });
      });
    }
    trim_scratch();
  });
  }
  return {out, lse};
}

// grads: dq, dk, dv, drpb [B, H, Rt] (summed over batch by the caller; only with rpb_grad),
// dek, dev
std::vector<std::optional<torch::Tensor>> na_backward(
    torch::Tensor q, torch::Tensor k, torch::Tensor v, std::optional<torch::Tensor> rpb_o,
    std::optional<torch::Tensor> ek_o, std::optional<torch::Tensor> ev_o,
    std::vector<torch::Tensor> tables, std::vector<int64_t> kd, double scale, torch::Tensor out,
    torch::Tensor lse, torch::Tensor dout, std::optional<torch::Tensor> dlse_o, int64_t nblk,
    std::vector<int64_t> geo, bool rpb_grad) {
  torch::Tensor rpb = opt(rpb_o), ek = opt(ek_o), ev = opt(ev_o), dlse = opt(dlse_o);
  const int64_t E = ek.defined() ? ek.size(1) : 0;
  Prob p = make_prob(geo, tables, kd, rpb, E);
  auto dq = torch::empty({p.B, p.N, p.H, p.D}, q.options());
  auto dk = torch::empty({p.B, p.N, p.Hk, p.D}, q.options()), dv = torch::empty_like(dk);
  torch::Tensor drpb, dek, dev;
  if (p.rpb && rpb_grad) drpb = torch::zeros({p.B * nblk, p.H, p.Rt}, q.options());
  if (E) { dek = torch::empty({nblk, p.B, E, p.Hk, p.D}, q.options()); dev = torch::empty_like(dek); }
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float *opp = out.data_ptr<float>(), *lp = lse.data_ptr<float>();
  const float *gp = dout.data_ptr<float>();
  const float *glp = dlse.defined() ? dlse.data_ptr<float>() : nullptr;
  const float* ekp = E ? ek.data_ptr<float>() : nullptr;
  const float* evp = E ? ev.data_ptr<float>() : nullptr;
  float *dqp = dq.data_ptr<float>(), *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>();
  float* drp = drpb.defined() ? drpb.data_ptr<float>() : nullptr;
  float* dekp = E ? dek.data_ptr<float>() : nullptr;
  float* devp = E ? dev.data_ptr<float>() : nullptr;
  const float qmul = (float)scale * LOG2E;
  {
  pybind11::gil_scoped_release nogil;
  at::parallel_for(0, (int64_t)p.B * p.Hk * nblk, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      const int blk = task % nblk, b = task / nblk / p.Hk, hk = task / nblk % p.Hk;
      float* acc = scratch(tl_acc, (size_t)p.D * VL * 2);
      float* accB = acc + (size_t)p.D * VL;
      float* exa = nullptr;
      if (E) { exa = scratch(tl_ex, (size_t)2 * E * p.D * VL); std::fill(exa, exa + (size_t)2 * E * p.D * VL, 0.f); }
      const Dim &Z = p.dim[0], &Y = p.dim[1], &X = p.dim[2];
      const int64_t ex_tok = (int64_t)p.Hk * p.D;
      const float* ekb = E ? ekp + (int64_t)b * E * ex_tok + hk * p.D : nullptr;
      const float* evb = E ? evp + (int64_t)b * E * ex_tok + hk * p.D : nullptr;
      const float inv_log2e = 1.f / LOG2E;
      for_sub_blocks(p, block_of(p, blk, nblk), [&](const Block& bl) {
        // keys: those the sub-block's queries attend and its own; queries: its own and those
        // attending its keys
        int klo, khi, qlo, qhi;
        touched(p, bl, false, klo, khi);
        touched(p, bl, true, qlo, qhi);
        const int blo = block_lo(p, bl), bhi = block_hi(p, bl);
        klo = khi > klo ? std::min(klo, blo) : blo; khi = std::max(khi, bhi);
        qlo = qhi > qlo ? std::min(qlo, blo) : blo; qhi = std::max(qhi, bhi);
        const Slabs s = load_slabs(p, b, hk, qp, kp, vp, qmul, klo, khi, qlo, qhi);
        const int NP = s.NP, base = s.base;
        const size_t plane = s.plane;
        // dO slabs, lse (base 2) and delta = rowsum(dO * O) - dlse, per head of the group
        float* Gs = scratch(tl_g, plane * p.G);
        float* L2 = scratch(tl_ls, (size_t)NP * p.G);
        float* DL = scratch(tl_dl, (size_t)NP * p.G);
        const int64_t q_tok = (int64_t)p.H * p.D;
        for (int g = 0; g < p.G; ++g) {
          const int h = hk * p.G + g;
          to_slab(gp + (int64_t)b * p.N * q_tok + h * p.D, q_tok, qlo, qhi, base, p.M, p.D, NP,
                  1.f, Gs + plane * g);
          for (int n = qlo; n < qhi; ++n) {
            const int64_t r = ((int64_t)b * p.N + n) * p.H + h;
            const float *o = opp + r * p.D, *go = gp + r * p.D;
            float acc = 0.f;
            for (int d = 0; d < p.D; ++d) acc += o[d] * go[d];
            DL[(size_t)g * NP + n - base] = acc - (glp ? glp[r] : 0.f);
            L2[(size_t)g * NP + n - base] = lp[r] * LOG2E;
          }
          const size_t end = (size_t)g * NP + qhi - base;
          std::fill(DL + end, DL + end + p.M, 0.f);
          std::fill(L2 + end, L2 + end + p.M, 0.f);
        }

        // ---- query pass: dQ, bias gradient, extra-token gradients
        for_query_tiles(p, hk, bl, [&](int g, int h, int z, int y, int n0, const Lanes& ln) {
          QPass c;
          c.Q = s.Q + plane * g + (n0 - base); c.dO = Gs + plane * g + (n0 - base);
          c.NP = NP; c.D = p.D;
          c.ln = &ln; c.dQ = acc; c.dek = exa; c.dev = E ? exa + (size_t)E * p.D * VL : nullptr;
          vf l2 = ld(L2 + (size_t)g * NP + (n0 - base)), dl = ld(DL + (size_t)g * NP + (n0 - base));
          for (int l = ln.nv; l < VL; ++l) { l2[l] = 1e30f; dl[l] = 0.f; }
          c.lse2 = l2; c.delta = dl;
          std::fill(acc, acc + (size_t)p.D * VL, 0.f);
          for_key_rows(Z, Y, X, z, y, [&](int rowoff, int rbias) {
            const float* brow = p.rpb ? p.rpb + (size_t)h * p.Rt + rbias : nullptr;
            c.drpb_row = drp ? drp + (((size_t)b * nblk + blk) * p.H + h) * p.Rt + rbias : nullptr;
            for (int t0 = 0; t0 < ln.tmax; t0 += CH) {
              run_chunk(ln, rowoff - base, X.dil, t0, std::min(CH, ln.tmax - t0),
                        [&]<int NJ, int MODE>(const Src& src, const vi* ok) {
                vf bias[NJ];
                if (brow) bias_chunk<NJ>(ln, brow, t0, 1, bias);
                qpass_chunk<NJ, MODE>(c, s.K, s.V, NP, src, ok, brow ? bias : nullptr, t0, 0);
              });
            }
          });
          c.drpb_row = nullptr;
          for (int e0 = 0; e0 < E; e0 += CH) {
            const int nj = std::min<int>(CH, E - e0);
            Src src; src.off = e0 * ex_tok; src.step = ex_tok; src.idx = nullptr;
            dispatch_nj(nj, [&]<int NJ>() {
              qpass_chunk<NJ, 2>(c, ekb, evb, 1, src, nullptr, nullptr, 0, e0);
            });
          }
          for (int l = 0; l < ln.nv; ++l) {
            float* o = dqp + (((int64_t)b * p.N + n0 + l) * p.H + h) * p.D;
            for (int d = 0; d < p.D; ++d) o[d] = acc[d * VL + l] * (float)scale;
          }
        });

        // ---- key pass: dK, dV (summed over the heads of the group)
        for (int row = bl.ra; row < bl.rb; ++row)
        for (int x0 = bl.xa; x0 < bl.xb; x0 += VL) {
          const int kz = row / Y.L, ky = row % Y.L;
          Lanes ln; key_lanes(X, x0, ln);
          const int n0 = (kz * Y.L + ky) * X.L + x0;
          std::fill(acc, acc + (size_t)p.D * VL * 2, 0.f);
          KPass c;
          c.K = s.K + (n0 - base); c.V = s.V + (n0 - base); c.NP = NP; c.D = p.D;
          c.dK = acc; c.dV = accB;
          for (int g = 0; g < p.G; ++g) {
            const int h = hk * p.G + g;
            c.Q = s.Q + plane * g; c.dO = Gs + plane * g;
            c.lse2 = L2 + (size_t)g * NP; c.delta = DL + (size_t)g * NP;
            for (int uz = 0; uz < Z.qcnt[kz]; ++uz) {
              const int qz = Z.qlo[kz] + uz * Z.dil;
              const int rz = kz / Z.dil - qz / Z.dil + Z.K - 1;
              for (int uy = 0; uy < Y.qcnt[ky]; ++uy) {
                const int qy = Y.qlo[ky] + uy * Y.dil;
                const int ry = ky / Y.dil - qy / Y.dil + Y.K - 1;
                const int rowoff = (qz * Y.L + qy) * X.L - base;
                const float* brow = p.rpb ? p.rpb + (size_t)h * p.Rt + (rz * Y.R + ry) * X.R : nullptr;
                for (int t0 = 0; t0 < ln.tmax; t0 += CH) {
                  run_chunk(ln, rowoff, X.dil, t0, std::min(CH, ln.tmax - t0),
                            [&]<int NJ, int MODE>(const Src& src, const vi* ok) {
                    vf bias[NJ];
                    if (brow) bias_chunk<NJ>(ln, brow, t0, -1, bias);
                    kpass_chunk<NJ, MODE>(c, src, ok, brow ? bias : nullptr);
                  });
                }
              }
            }
          }
          for (int l = 0; l < ln.nv; ++l) {
            const int64_t r = (((int64_t)b * p.N + n0 + l) * p.Hk + hk) * p.D;
            for (int d = 0; d < p.D; ++d) {
              dkp[r + d] = acc[d * VL + l] * inv_log2e;
              dvp[r + d] = accB[d * VL + l];
            }
          }
        }
      });
      if (E) {
        for (int e = 0; e < E; ++e)
          for (int d = 0; d < p.D; ++d) {
            const int64_t r = (((int64_t)blk * p.B + b) * E + e) * ex_tok + hk * p.D + d;
            dekp[r] = hsum(ld(exa + ((size_t)e * p.D + d) * VL)) * inv_log2e;
            devp[r] = hsum(ld(exa + ((size_t)(E + e) * p.D + d) * VL));
          }
      }
    }
    trim_scratch();
  });
  }
  auto o = [](const torch::Tensor& t) { return t.defined() ? std::optional<torch::Tensor>(t) : std::nullopt; };
  return {dq, dk, dv, o(drpb), o(dek), o(dev)};
}

int64_t lanes() { return VL; }

// Floats of scratch the calling thread holds (with one torch thread, the kernels' own).
int64_t scratch_floats() {
  size_t n = 0;
  for (auto* buf : {&tl_k, &tl_v, &tl_q, &tl_g, &tl_ls, &tl_dl, &tl_acc, &tl_ex}) n += buf->capacity();
  return (int64_t)n;
}
"""

FUNCTIONS = ["na_forward", "na_backward", "lanes", "scratch_floats"]
