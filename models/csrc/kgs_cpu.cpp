// Direct 3D convolution from the kept columns of a kernel-group-sparse weight (models/kgs_cpu.py).
//
// Under blk-kgs the gM filters of a block row keep the same (input channel, kernel offset) columns.
// Per block row this file keeps the list of those columns, each turned into one offset into the
// zero-padded input, and the block row's weights packed column by column, MR filters at a time.
// A register tile of MR filters x NV vectors of VL output voxels then runs over the kept columns:
// per column, NV vector loads of input and MR broadcasts of weights feed MR*NV FMAs, and the
// same input vectors serve every filter of the block row (the second group of MR filters finds
// them in L1). Nothing is gathered: the padded copy of the input and the output are all it writes.
//
// The padded input interleaves the rows of blocks of 4 input channels, (N, C/4, T, H, 4, W). The kept
// columns of a chunk of channels are taken in order of (kernel plane, channel block, kernel offset in
// the plane, channel): KGS keeps a kernel offset for a group of channels at once, so its columns read
// adjacent rows (fewer lines and pages per tile than a channel's whole volume apart: about a tenth
// faster on C3D's layers), and a tile leaves out the kernel planes that read only the T padding at
// its output planes (C3D's conv5 has 2 output planes: a third of its multiply-adds read padding).
// Each row is stored in `phases` = W-stride interleaved copies (padded column w lands in
// phase w % s at w / s), so the VL consecutive outputs of a vector always read VL consecutive
// floats, whatever the stride or dilation. A vector never crosses an output row; a row narrower
// than a vector (C3D's conv5 is 7 wide) or a row's last vector ends in a partial store.
//
// Cache blocking: a work item is a few block rows over a range of output rows. The input channels
// are taken in chunks small enough that their rows of input for the range stay in L2 while each
// block row of the item runs its kept columns of the chunk over every tile of the range; partial
// sums stay in the output (in L2 too) between chunks. Threads take work items from a shared
// counter in order of output rows, so that they read the same input, from L3 at worst.
//
// The ReLU after the conv, and for C3D's conv1 the 2x2 max pool after that, are applied as the tiles
// store their sums (models/slim.py: fuse_relu, fuse_pool).
//
// The instruction set is chosen when this file is compiled (models/kgs_cpu.py passes -mavx2 -mfma
// or -mavx512f from the CPU's flags at run time); without either, portable C++ that the compiler
// vectorises as it can.
// Only the headers used (not <torch/extension.h>): the build takes a third of the time.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace {

// ------------------------------------------------------------------------------- vector layer

#if defined(__AVX512F__)
constexpr int VL = 16;
constexpr const char* ISA = "avx512";
using vec = __m512;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vset(float v) { return _mm512_set1_ps(v); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline vec vbroadcast(const float* p) { return _mm512_set1_ps(*p); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec vrelu(vec a) { return _mm512_max_ps(_mm512_setzero_ps(), a); }   // NaN stays NaN, as torch.relu
inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
inline __mmask16 lanes(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
inline void vstore_part(float* p, vec v, int n) { _mm512_mask_storeu_ps(p, lanes(n), v); }
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int VL = 8;
constexpr const char* ISA = "avx2";
using vec = __m256;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vset(float v) { return _mm256_set1_ps(v); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline vec vbroadcast(const float* p) { return _mm256_broadcast_ss(p); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec vrelu(vec a) { return _mm256_max_ps(_mm256_setzero_ps(), a); }   // NaN stays NaN, as torch.relu
inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
// AMD's masked stores are microcoded (about ten times slower than a store): the lanes go out by
// halves instead, which a layer's fixed row width makes predictable.
inline void vstore_part(float* p, vec v, int n) {
  __m128 part = _mm256_castps256_ps128(v);
  if (n >= 4) {
    _mm_storeu_ps(p, part);
    part = _mm256_extractf128_ps(v, 1);
    p += 4;
    n -= 4;
  }
  if (n >= 2) {
    _mm_storel_pi(reinterpret_cast<__m64*>(p), part);
    part = _mm_movehl_ps(part, part);
    p += 2;
    n -= 2;
  }
  if (n) _mm_store_ss(p, part);
}
#else
constexpr int VL = 8;
constexpr const char* ISA = "portable";
struct vec {
  float v[VL];
};
inline vec vzero() { return vec{}; }
inline vec vset(float x) { vec r; for (int i = 0; i < VL; ++i) r.v[i] = x; return r; }
inline vec vload(const float* p) { vec r; std::memcpy(r.v, p, sizeof r.v); return r; }
inline vec vbroadcast(const float* p) { return vset(*p); }
inline vec vfma(vec a, vec b, vec c) { for (int i = 0; i < VL; ++i) c.v[i] += a.v[i] * b.v[i]; return c; }
inline vec vrelu(vec a) { for (int i = 0; i < VL; ++i) a.v[i] = 0.f > a.v[i] ? 0.f : a.v[i]; return a; }
inline void vstore(float* p, vec v) { std::memcpy(p, v.v, sizeof v.v); }
inline void vstore_part(float* p, vec v, int n) { std::memcpy(p, v.v, n * sizeof(float)); }
#endif

inline void prefetch(const float* p) {
#if defined(__GNUC__)
  __builtin_prefetch(p, 0, 3);
#endif
}

inline void prefetch_for_write(float* p) {
#if defined(__GNUC__)
  __builtin_prefetch(p, 1, 1);
#endif
}

inline float nan_max(float m, float v) { return (v > m || v != v) ? v : m; }   // NaN wins, as PyTorch's pools

// A 2x2 max pool of two rows' vectors `a` (row h) and `b` (row h + 1) of VL outputs: n = VL / 2 or fewer
// pooled outputs to p.
inline void vstore_pooled(float* p, vec a, vec b, int n) {
#if defined(__AVX2__) && !defined(__AVX512F__)
  if (n == VL / 2) {
    auto max = [](__m256 x, __m256 y) {       // y where x is not NaN and y is larger or NaN, else x
      return _mm256_blendv_ps(_mm256_max_ps(x, y), x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    };
    const __m256 rows = max(a, b);
    const __m256 pairs = max(rows, _mm256_permute_ps(rows, 0xB1));      // lanes 2k: max of lanes 2k, 2k + 1
    const __m256 packed = _mm256_permutevar8x32_ps(pairs, _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6));
    _mm_storeu_ps(p, _mm256_castps256_ps128(packed));
    return;
  }
#endif
  float x[VL], y[VL];
  vstore(x, a);
  vstore(y, b);
  for (int k = 0; k < n; ++k) p[k] = nan_max(nan_max(x[2 * k], x[2 * k + 1]), nan_max(y[2 * k], y[2 * k + 1]));
}

// Register tiles: MR filters x NV vectors, MR*NV accumulators plus NV input vectors and one
// broadcast within the 16 vector registers of AVX2.
constexpr int MR_MAX = 4;
constexpr int NV_MAX = 8;
constexpr int nv_for(int mr) { return mr == 4 ? 3 : mr == 3 ? 4 : mr == 2 ? 6 : 8; }

// Every loop over the tile's filters and vectors is unrolled where it is written: then GCC keeps
// the accumulators in registers (unrolled later, it leaves them in memory, stored at every column).
#define UNROLL _Pragma("GCC unroll 16")

// What one tile computes: NV output vectors, each VL consecutive voxels of one output row.
struct Tile {
  int64_t in[NV_MAX];    // offset of the vector's first input element in the padded input
  int64_t out[NV_MAX];   // offset of its first voxel in one filter's output (batch included)
  int valid[NV_MAX];     // voxels of the vector inside the row (VL but at a row's end)
  int count;
  int64_t plane, plane_end;   // its first and last output plane (in place, a tile keeps to one)
  bool pooled;           // pairs of vectors of rows h, h + 1 pooled 2x2 as they are stored (valid: pooled outputs)
};

// The tile's sums over a run of `ncols` kept columns (their byte offsets into the padded input, and
// their weights packed MR per column), from the bias or the sums stored so far, stored once.
template <int MR, int NV>
void run_tile(const float* __restrict x, const int64_t* __restrict offsets, const float* __restrict w,
              int64_t ncols, const Tile& t, float* __restrict y, int64_t filter_stride, int filters, bool first,
              const float* bias, const Tile* next, bool relu) {
  vec acc[MR][NV];
  UNROLL
  for (int m = 0; m < MR; ++m) {
    UNROLL
    for (int j = 0; j < NV; ++j) {
      if (m >= filters) {
        acc[m][j] = vzero();
      } else if (first) {
        acc[m][j] = bias ? vset(bias[m]) : vzero();
      } else {
        acc[m][j] = vload(y + m * filter_stride + t.out[j]);   // lanes past a row: read, never written
      }
    }
  }
  // The next tile's input is fetched into L1 while this one computes (one tile's loads of one
  // column seldom share lines with the next tile's, and the hardware misses the pattern). Only
  // where an output row holds a whole tile (compute): on narrower rows (C3D's conv4, conv5) the next
  // tile's lines are mostly this one's, and the prefetches cost more than they bring (1.02-1.06x).
  const char* next_first = next ? reinterpret_cast<const char*>(x + next->in[0]) : nullptr;
  const char* next_last = next ? reinterpret_cast<const char*>(x + next->in[next->count - 1] + VL - 1) : nullptr;
  const char* xs[NV];
  UNROLL
  for (int j = 0; j < NV; ++j) xs[j] = reinterpret_cast<const char*>(x + t.in[j]);
  // Byte offsets and two columns per iteration: the loop's integer work (address arithmetic, counter)
  // shares the front end with the FMAs; this way it measured 1.05-1.12x faster on C3D's layers.
  _Pragma("GCC unroll 2")
  for (int64_t u = 0; u < ncols; ++u) {
    const int64_t o = offsets[u];
    vec a[NV];
    UNROLL
    for (int j = 0; j < NV; ++j) a[j] = vload(reinterpret_cast<const float*>(xs[j] + o));
    if (next) {
      prefetch(reinterpret_cast<const float*>(next_first + o));
      prefetch(reinterpret_cast<const float*>(next_last + o));
    }
    const float* wu = w + u * MR;
    UNROLL
    for (int m = 0; m < MR; ++m) {
      const vec b = vbroadcast(wu + m);
      UNROLL
      for (int j = 0; j < NV; ++j) acc[m][j] = vfma(a[j], b, acc[m][j]);
    }
  }
  if (t.pooled) {        // vectors 2i and 2i + 1: rows h and h + 1, pooled 2x2 into VL / 2 outputs at out[2i]
    UNROLL
    for (int m = 0; m < MR; ++m) {
      if (m >= filters) break;
      UNROLL
      for (int j = 0; j + 1 < NV; j += 2) {
        if (j + 1 >= t.count) break;
        vstore_pooled(y + m * filter_stride + t.out[j], relu ? vrelu(acc[m][j]) : acc[m][j],
                      relu ? vrelu(acc[m][j + 1]) : acc[m][j + 1], t.valid[j]);
      }
    }
    return;
  }
  UNROLL
  for (int m = 0; m < MR; ++m) {
    if (m >= filters) break;
    UNROLL
    for (int j = 0; j < NV; ++j) {
      float* p = y + m * filter_stride + t.out[j];
      const vec v = relu ? vrelu(acc[m][j]) : acc[m][j];
      if (t.valid[j] == VL) vstore(p, v); else vstore_part(p, v, t.valid[j]);
    }
  }
}

using TileFn = void (*)(const float*, const int64_t*, const float*, int64_t, const Tile&, float*, int64_t, int, bool,
                        const float*, const Tile*, bool);

template <int MR, int... NV>
constexpr std::array<TileFn, NV_MAX + 1> tile_table(std::integer_sequence<int, NV...>) {
  return {nullptr, (NV + 1 <= nv_for(MR) ? &run_tile<MR, (NV + 1 <= nv_for(MR) ? NV + 1 : 1)> : nullptr)...};
}

// [MR][NV]
const std::array<std::array<TileFn, NV_MAX + 1>, MR_MAX + 1> kTiles = {
    std::array<TileFn, NV_MAX + 1>{}, tile_table<1>(std::make_integer_sequence<int, NV_MAX>{}),
    tile_table<2>(std::make_integer_sequence<int, NV_MAX>{}), tile_table<3>(std::make_integer_sequence<int, NV_MAX>{}),
    tile_table<4>(std::make_integer_sequence<int, NV_MAX>{})};

// Cache blocking, in bytes per core (L2: 512 KiB on AMD Zen 3, 1-2 MiB on recent Intel): a work
// item's output block (its block rows' filters over its output rows) and the input rows one chunk
// of channels contributes to it both stay in L2; one block row's part of an output row range is
// about kRowBudget. Measured on C3D's layers; flat around these.
constexpr int64_t kRowBudget = 32 << 10;
constexpr int64_t kOutputBudget = 128 << 10;
constexpr int64_t kInputBudget = 256 << 10;
constexpr int64_t kItemsPerThread = 4;   // enough work items for the threads to balance
constexpr double kMinColumns = 48;       // kept columns per block row and chunk, at least
constexpr double kMaxColumns = 192;      // and at most: their weights and offsets (40 B a column) stay in
                                         // L1 while every tile of the item runs over them (C3D's conv5
                                         // has 5 tiles per item, and a block row 2800 kept columns)
constexpr int64_t kMinRows = 16;         // rows per output plane of an item, at least (or the plane):
                                         // shorter runs of input defeat the hardware prefetchers

// --------------------------------------------------------------------------------- the kernel

// Output buffers the kernels keep between calls (KGSKernel::forward), in bytes, all kernels of the process
// together, and at most how many: past it a kernel lets its output go with the caller (at batch 32 a pass
// of R(2+1)D writes about 8 GiB of outputs).
std::atomic<int64_t> g_kept_bytes{0};
std::atomic<int64_t> g_keep_budget{int64_t{1} << 30};

int64_t keep_outputs_up_to(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "keep_outputs_up_to: a number of bytes >= 0 expected, got ", bytes);
  return g_keep_budget.exchange(bytes);
}

// A work item: a block of output rows (output planes t0.. and rows h0.. of sample n) for a group of
// block rows starting at r0.
struct Item {
  int64_t r0, n, t0, h0;
};

struct Plan {
  int64_t out[3];               // T', H', W'
  int64_t tp, hp, wq, phases;   // padded input: T, H, columns per phase, phases (= W stride)
  int64_t row, row_b, plane, block;   // its strides: a channel's row, a channel block's row, plane, block
  int64_t flat;                 // planes re-cut into rows of this length (flat_row), or 0
  int64_t tb, hb;               // output planes and rows per work item
  int64_t block_rows_per_item;  // block rows per work item (they share each chunk of input in L2)
  int64_t chunks;               // chunks of input channels (in place: chunks / kT of each kernel plane)
  at::Tensor padded;            // (N, C/cb, Tp, Hp, cb, phases, Wq) + slack, zero borders written once;
                                // in place: a flat copy of an input whose storage ends with it, or none
  std::vector<char> need_t, need_h;   // padded planes and rows some output reads (strides skip some)
  std::vector<int64_t> offsets;       // per packed column: its offset into the padded input, in bytes
  std::vector<int64_t> chunk_start;   // [block row][range][kernel plane]: its first column there (chunks + 1 each)
  std::vector<float> weights;         // the kernel's weights in the plan's column order, where that differs
  std::vector<int64_t> first_range, last_range;   // [block row]: its first and last channel range with columns
  std::vector<Item> items;            // in order of output blocks
};

class KGSKernel {
 public:
  // `weight` (O, I, kT, kH, kW) float32: its block rows of `block_rows` filters keep the columns any
  // of their filters uses; zero columns are skipped, so a dense weight runs every column.
  KGSKernel(at::Tensor weight, std::optional<at::Tensor> bias, int64_t block_rows, std::vector<int64_t> stride,
            std::vector<int64_t> padding, std::vector<int64_t> dilation, bool relu, bool pool)
      : stride_(stride), padding_(padding), dilation_(dilation), relu_(relu), pool_(pool) {
    TORCH_CHECK(weight.dim() == 5 && weight.scalar_type() == at::kFloat, "KGSKernel: weight must be 5-D float32");
    TORCH_CHECK(stride.size() == 3 && padding.size() == 3 && dilation.size() == 3, "KGSKernel: 3 strides, paddings, "
                "dilations expected");
    auto w = weight.contiguous().to(at::kCPU);
    out_channels_ = w.size(0);
    in_channels_ = w.size(1);
    for (int d = 0; d < 3; ++d) kernel_[d] = w.size(d + 2);
    const int64_t k = kernel_[0] * kernel_[1] * kernel_[2];
    const int64_t ik = in_channels_ * k;
    // A kernel of 1 x 1 in H and W with no padding and unit strides there (R(2+1)D's and S3D's temporal
    // 3x1x1 convs, S3D's 1x1x1) pads at most in T: it reads its input where it lies, and drops at the
    // first and last output planes the kernel planes that would read padding. The padded copy was a
    // quarter of such a conv's time. Its columns go in order of (kernel plane, channel), so that a
    // chunk holds one kernel plane.
    in_place_ = kernel_[1] == 1 && kernel_[2] == 1 && padding_[1] == 0 && padding_[2] == 0 && stride_[1] == 1 &&
                stride_[2] == 1 && !pool_;
    cb_ = !in_place_ && in_channels_ % 4 == 0 ? 4 : 1;
    gm_ = std::max<int64_t>(1, std::min(block_rows, out_channels_));
    mr_ = static_cast<int>(std::min<int64_t>(MR_MAX, gm_));
    groups_ = (gm_ + mr_ - 1) / mr_;
    const int64_t rows = (out_channels_ + gm_ - 1) / gm_;
    const float* wp = w.data_ptr<float>();
    row_start_.assign(rows + 1, 0);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t f0 = r * gm_, f1 = std::min(out_channels_, f0 + gm_);
      for (int64_t key = 0; key < ik; ++key) {
        const int64_t c = column_of(key, k);
        bool kept = false;
        for (int64_t f = f0; f < f1 && !kept; ++f) kept = wp[f * ik + c] != 0.f;
        if (kept) columns_.push_back(key);
      }
      row_start_[r + 1] = static_cast<int64_t>(columns_.size());
    }
    // Weights of block row r: groups of MR filters, each [kept column][MR], beginning at
    // row_start_[r] * groups_ * MR; filters past the block row (or past O) hold zeros.
    weights_.assign(columns_.size() * groups_ * mr_, 0.f);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t u0 = row_start_[r], width = row_start_[r + 1] - u0;
      for (int64_t g = 0; g < groups_; ++g) {
        for (int64_t u = 0; u < width; ++u) {
          for (int m = 0; m < mr_; ++m) {
            const int64_t local = g * mr_ + m, f = r * gm_ + local;
            if (local < gm_ && f < out_channels_)
              weights_[u0 * groups_ * mr_ + (g * width + u) * mr_ + m] = wp[f * ik + column_of(columns_[u0 + u], k)];
          }
        }
      }
    }
    if (bias.has_value() && bias->defined()) {
      auto b = bias->contiguous().to(at::kCPU).to(at::kFloat);
      bias_.assign(b.data_ptr<float>(), b.data_ptr<float>() + out_channels_);
    }
  }

  ~KGSKernel() { let_last_go(); }

  int64_t kept_columns() const { return static_cast<int64_t>(columns_.size()); }

  // MACs the kernel is asked for per output voxel: kept weights (the tiles' padding excluded).
  int64_t kept_weights() const {
    int64_t total = 0;
    const int64_t rows = static_cast<int64_t>(row_start_.size()) - 1;
    for (int64_t r = 0; r < rows; ++r)
      total += (row_start_[r + 1] - row_start_[r]) * (std::min(out_channels_, (r + 1) * gm_) - r * gm_);
    return total;
  }

  at::Tensor forward(at::Tensor x) {
    TORCH_CHECK(x.dim() == 5 && x.size(1) == in_channels_, "KGSKernel: expected (N, ", in_channels_,
                ", T, H, W) input, got ", x.sizes());
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "KGSKernel: float32 CPU input only");
    std::lock_guard<std::mutex> guard(lock_);    // the padded workspace is reused call after call
    const auto given = x.sizes().vec();
    auto key = given;
    key.push_back(at::get_num_threads());         // the work split follows the thread count
    Plan& plan = plan_for(key);
    auto xc = x.contiguous();
    if (plan.flat) xc = xc.view({given[0], given[1], given[2], given[3] * given[4] / plan.flat, plan.flat});
    if (!in_place_) fill_padded(xc, plan);
    const float* input = xc.data_ptr<float>();
    if (in_place_ && plan.out[2] % VL) {
      // A row's last vector reads up to VL - 1 floats past the row: past the input's end only where its
      // storage ends with its last row (this kernel's outputs keep VL floats of slack); then from a copy.
      const int64_t after = static_cast<int64_t>(xc.storage().nbytes() / sizeof(float)) - xc.storage_offset() -
                            xc.numel();
      if (after < VL) {
        if (!plan.padded.defined()) plan.padded = at::zeros({xc.numel() + VL}, at::kFloat);   // one shape a plan
        plan.padded.narrow(0, 0, xc.numel()).copy_(xc.reshape({-1}));
        input = plan.padded.data_ptr<float>();
      }
    }
    const int64_t n = x.size(0);
    // VL floats of slack after the output: a row's last vector is loaded whole (and stored in part).
    // With the 2x2 pool (C3D's pool1 after conv1): H and W halved, rounded down, as nn.MaxPool3d does.
    const int64_t oh = pool_ ? plan.out[1] / 2 : plan.out[1], ow = pool_ ? plan.out[2] / 2 : plan.out[2];
    const int64_t size = n * out_channels_ * plan.out[0] * oh * ow;
    // The output buffer is kept and used again once no tensor the caller holds refers to it any more.
    // A fresh one of a few MB or more comes from mmap whenever the allocator has given back the last
    // one, and its page faults cost as much as a third of the conv (R(2+1)D's layer1 convs, 29 MB: 7056
    // faults, 22 ms a call instead of 14.6; C3D's conv1, 51 MB: 16 ms); whether it does depends on
    // what else the process allocated in between. Kept only while all kernels' kept outputs stay within
    // g_keep_budget.
    at::Tensor y;
    if (last_.defined() && last_.numel() == size + VL && last_.storage().use_count() == 1) {
      y = last_;
    } else {
      y = at::empty({size + VL}, x.options());
      let_last_go();
      const int64_t bytes = (size + VL) * static_cast<int64_t>(sizeof(float));
      if (g_kept_bytes.fetch_add(bytes) + bytes <= g_keep_budget.load()) {
        last_ = y;
        last_bytes_ = bytes;
      } else {
        g_kept_bytes -= bytes;
      }
    }
    y.narrow(0, size, VL).zero_();
    compute(plan, y.data_ptr<float>(), input);
    return y.narrow(0, 0, size).view({n, out_channels_, plan.out[0], plan.flat ? given[3] : oh,
                                      plan.flat ? given[4] : ow});
  }

 private:
  void let_last_go() {
    g_kept_bytes -= last_bytes_;
    last_ = at::Tensor();
    last_bytes_ = 0;
  }

  // A kernel read in place (1 x 1 in H and W, no padding and unit strides there: R(2+1)D's and S3D's
  // temporal 3x1x1 convs, S3D's 1x1x1) computes the same on any split of an input plane into rows: this is
  // the row length that wastes the fewest vector lanes (14x14 planes: one row of 196, 25 vectors
  // instead of 28; 28x28: rows of 56, 98 instead of 112), or 0 where W itself is best.
  int64_t flat_row(int64_t h, int64_t w) const {
    if (!in_place_) return 0;
    int64_t best = w, fewest = h * ((w + VL - 1) / VL);
    for (int64_t length = w + 1; length <= h * w; ++length) {
      const int64_t vectors = (h * w) % length ? fewest : (h * w / length) * ((length + VL - 1) / VL);
      if (vectors < fewest) {
        best = length;
        fewest = vectors;
      }
    }
    return best == w ? 0 : best;
  }

  // Columns are kept in order of (kernel plane, block of cb_ channels, kernel offset within the plane,
  // channel in the block): the padded input interleaves the rows of a block's channels, so a kernel
  // offset's cb_ columns read cb_ adjacent rows, and the columns of one kernel plane are a run that a
  // tile leaves out where that plane reads the padding (the first and last output planes). In place
  // (cb_ 1, one offset per plane): (kernel plane, channel). key -> c * k + kernel offset.
  int64_t column_of(int64_t key, int64_t k) const {
    const int64_t khw = kernel_[1] * kernel_[2], kt = key / (in_channels_ * khw), rest = key % (in_channels_ * khw);
    const int64_t block = rest / (khw * cb_), within = rest % (khw * cb_);
    return (block * cb_ + within % cb_) * k + kt * khw + within / cb_;
  }

  Plan& plan_for(const std::vector<int64_t>& shape) {
    auto found = plans_.find(shape);
    if (found != plans_.end()) return found->second;
    if (plans_.size() >= 2) plans_.erase(plans_.begin());   // the workspaces of two shapes at most
    Plan p;
    p.flat = flat_row(shape[3], shape[4]);
    const int64_t n = shape[0];
    const int64_t size[3] = {shape[2], p.flat ? shape[3] * shape[4] / p.flat : shape[3], p.flat ? p.flat : shape[4]};
    for (int d = 0; d < 3; ++d) {
      p.out[d] = (size[d] + 2 * padding_[d] - dilation_[d] * (kernel_[d] - 1) - 1) / stride_[d] + 1;
      TORCH_CHECK(p.out[d] >= 1, "KGSKernel: input ", c10::IntArrayRef(shape.data(), 5), " is smaller than the kernel");
    }
    TORCH_CHECK(!pool_ || (p.out[1] >= 2 && p.out[2] >= 2), "KGSKernel: input ", c10::IntArrayRef(shape.data(), 5),
                " gives outputs too small for the 2x2 pool");
    p.tp = size[0] + 2 * padding_[0];
    p.hp = size[1] + 2 * padding_[1];
    p.phases = stride_[2];
    p.wq = (size[2] + 2 * padding_[2] + p.phases - 1) / p.phases;
    // Rows start on 32 bytes where that costs at most an eighth more input (C3D's 30-float rows of
    // conv3 -> 32, 58 -> 64, 114 -> 120; not conv5's 9): a vector at a multiple of 8 in the row then
    // never splits a cache line. 1.0-1.06x on C3D's layers.
    p.row = p.phases * p.wq;
    if (!in_place_ && (p.row + 7) / 8 * 8 * 8 <= p.row * 9) p.row = (p.row + 7) / 8 * 8;
    p.row_b = cb_ * p.row;
    p.plane = p.hp * p.row_b;
    p.block = (in_place_ ? size[0] : p.tp) * p.plane;     // in place: the input's own planes
    const int64_t row = p.row, row_b = p.row_b, plane = p.plane, block = p.block;
    // Slack past the end: the lanes of a row's last vector beyond the row read (and discard) it.
    if (!in_place_) p.padded = at::zeros({n * (in_channels_ / cb_) * block + 2 * VL + p.wq}, at::kFloat);
    const int64_t k = kernel_[0] * kernel_[1] * kernel_[2];
    auto offset_of = [&](int64_t u) {     // of kept column u (in key order) into the padded input, in bytes
      const int64_t col = column_of(columns_[u], k), c = col / k, kk = col % k;
      const int64_t kt = kk / (kernel_[1] * kernel_[2]), kh = kk / kernel_[2] % kernel_[1], kw = kk % kernel_[2];
      const int64_t w = kw * dilation_[2];
      return static_cast<int64_t>(sizeof(float)) *
             ((c / cb_) * block + (c % cb_) * row + kt * dilation_[0] * plane + kh * dilation_[1] * row_b +
              (w % p.phases) * p.wq + w / p.phases - (in_place_ ? padding_[0] * plane : 0));
    };
    // Work items: a block of output planes x rows (tb x hb) times a group of block rows. A chunk of
    // input channels should give each block row about kMinColumns kept columns (fewer, and loading
    // and storing the tiles' sums costs as much as the FMAs: R(2+1)D's 3x1x1 convs keep about one
    // column per channel), and its input rows for the item should fit kInputBudget: the item's
    // output rows follow, in the block shape that reads the fewest input rows per output row (taller
    // for 3x1x1 kernels) with kMinRows rows per plane. Then block rows per item up to kOutputBudget; fewer
    // rows and block rows while the threads would get fewer than kItemsPerThread items each.
    const int64_t vectors = (p.out[2] + VL - 1) / VL;
    const int64_t row_bytes = groups_ * mr_ * vectors * VL * 4;      // one block row, one output row
    const int64_t rows = static_cast<int64_t>(row_start_.size()) - 1;
    const int64_t wanted = kItemsPerThread * std::max(1, at::get_num_threads());
    auto footprint = [&](int64_t tb, int64_t hb) {     // bytes of input rows one channel gives a block
      const int64_t in_t = std::min(p.tp, (tb - 1) * stride_[0] + (kernel_[0] - 1) * dilation_[0] + 1);
      const int64_t in_h = std::min(p.hp, (hb - 1) * stride_[1] + (kernel_[1] - 1) * dilation_[1] + 1);
      return in_t * in_h * row * 4;
    };
    auto shape_for = [&](int64_t target) {
      double best = 0;
      for (int64_t a = 1; a <= std::min(p.out[0], target); ++a) {
        const int64_t b = std::min(p.out[1], (target + a - 1) / a);
        if (a > 1 && b < std::min(p.out[1], kMinRows)) break;
        const double cost = double(footprint(a, b)) / double(a * b);
        if (a == 1 || cost < best * 0.999) {
          best = cost;
          p.tb = a;
          p.hb = b;
        }
      }
    };
    auto count = [&]() {
      return n * ((p.out[0] + p.tb - 1) / p.tb) * ((p.out[1] + p.hb - 1) / p.hb) *
             ((rows + p.block_rows_per_item - 1) / p.block_rows_per_item);
    };
    const double per_channel = double(columns_.size()) / double(std::max<int64_t>(1, rows * in_channels_));
    const int64_t min_channels = std::clamp<int64_t>(int64_t(kMinColumns / std::max(per_channel, 1e-3)), 1, in_channels_);
    int64_t target = std::clamp<int64_t>(kRowBudget / row_bytes, 1, p.out[0] * p.out[1]);
    shape_for(target);
    while (target > 1 && min_channels * footprint(p.tb, p.hb) > kInputBudget) shape_for(target = (target + 1) / 2);
    p.block_rows_per_item = std::clamp<int64_t>(kOutputBudget / (p.tb * p.hb * row_bytes), 1, rows);
    while (p.block_rows_per_item > 1 && count() < wanted) p.block_rows_per_item = (p.block_rows_per_item + 1) / 2;
    while (target > 1 && count() < wanted) shape_for(target = (target + 1) / 2);
    p.tb = (p.out[0] + (p.out[0] + p.tb - 1) / p.tb - 1) / ((p.out[0] + p.tb - 1) / p.tb);    // even sizes
    p.hb = (p.out[1] + (p.out[1] + p.hb - 1) / p.hb - 1) / ((p.out[1] + p.hb - 1) / p.hb);
    if (pool_) p.hb = std::max<int64_t>(2, p.hb / 2 * 2);    // items of whole row pairs
    const int64_t max_channels = std::max<int64_t>(1, int64_t(kMaxColumns / std::max(per_channel, 1e-3)));
    int64_t channels_per_chunk =
        std::clamp<int64_t>(std::min(kInputBudget / footprint(p.tb, p.hb), max_channels), min_channels, in_channels_);
    channels_per_chunk = (channels_per_chunk + cb_ - 1) / cb_ * cb_;
    if (pool_) channels_per_chunk = in_channels_;      // pooled as stored: one chunk, no partial sums
    // A chunk holds one kernel plane of a range of channels; a tile takes the chunks of every kernel plane
    // of a range in one call. In place a range's columns are about one per channel and kernel plane (R(2+1)D's
    // 3x1x1 convs): its channels are that many more than the budgets above give. Chunk q: kernel plane
    // q / per_plane, channels from (q % per_plane) * channels_per_chunk; the key of its first column.
    if (in_place_) channels_per_chunk = std::min(in_channels_, channels_per_chunk * kernel_[0]);
    const int64_t per_plane = (in_channels_ + channels_per_chunk - 1) / channels_per_chunk;
    const int64_t khw = kernel_[1] * kernel_[2];
    p.chunks = per_plane * kernel_[0];
    auto chunk_key = [&](int64_t q) {
      return (q / per_plane * in_channels_ + std::min(q % per_plane * channels_per_chunk, in_channels_)) * khw;
    };
    // Chunks in key order (kernel plane, then channels), per block row; then the columns go in order of
    // (range, kernel plane): a range's kernel planes follow each other, and a tile takes those its output
    // planes read as one run. Only where there are several kernel planes and ranges does that move any
    // column; then the plan keeps the offsets and weights in its own order (`order`: plan order -> key order).
    std::vector<int64_t> key_start(p.chunks + 1), order;
    const bool reorder = kernel_[0] > 1 && per_plane > 1;
    p.chunk_start.resize(rows * (p.chunks + 1));
    p.first_range.assign(rows, per_plane);
    p.last_range.assign(rows, -1);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t* first = columns_.data() + row_start_[r];
      const int64_t* last = columns_.data() + row_start_[r + 1];
      for (int64_t c = 0; c <= p.chunks; ++c)
        key_start[c] = std::lower_bound(first, last, chunk_key(c)) - columns_.data();
      int64_t* starts = p.chunk_start.data() + r * (p.chunks + 1);     // [range][kernel plane], in plan order
      int64_t u = row_start_[r];
      for (int64_t q = 0; q < per_plane; ++q) {
        for (int64_t kt = 0; kt < kernel_[0]; ++kt) {
          const int64_t c = kt * per_plane + q;
          starts[q * kernel_[0] + kt] = u;
          u += key_start[c + 1] - key_start[c];
          for (int64_t v = key_start[c]; reorder && v < key_start[c + 1]; ++v) order.push_back(v);
          if (key_start[c + 1] == key_start[c]) continue;
          p.first_range[r] = std::min(p.first_range[r], q);
          p.last_range[r] = std::max(p.last_range[r], q);
        }
      }
      starts[p.chunks] = u;
    }
    p.offsets.resize(columns_.size());
    for (size_t u = 0; u < columns_.size(); ++u) p.offsets[u] = offset_of(reorder ? order[u] : u);
    if (reorder) {      // block row r's group g, column u (plan order) at (u0 * groups + g * width + u - u0) * mr
      p.weights.resize(weights_.size());
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t u0 = row_start_[r], width = row_start_[r + 1] - u0;
        for (int64_t g = 0; g < groups_; ++g)
          for (int64_t u = u0; u < u0 + width; ++u)
            std::copy_n(weights_.data() + (u0 * groups_ + g * width + order[u] - u0) * mr_, mr_,
                        p.weights.data() + (u0 * groups_ + g * width + u - u0) * mr_);
      }
    }
    // Items in order of output blocks: the threads work through the same input (in L3); block row
    // after block row, the whole input would stream from memory once per block row.
    for (int64_t nn = 0; nn < n; ++nn)
      for (int64_t t0 = 0; t0 < p.out[0]; t0 += p.tb)
        for (int64_t h0 = 0; h0 < p.out[1]; h0 += p.hb)
          for (int64_t r = 0; r < rows; r += p.block_rows_per_item) p.items.push_back({r, nn, t0, h0});
    // Planes and rows of padded input that outputs read: with strides over 1 and small kernels
    // (1x1x1 stride 2 reads a quarter of its input) the others need no copy. In place: no copy.
    if (!in_place_) {
      p.need_t.assign(p.tp, 0);
      p.need_h.assign(p.hp, 0);
      for (int64_t t = 0; t < p.out[0]; ++t)
        for (int64_t kt = 0; kt < kernel_[0]; ++kt) p.need_t[t * stride_[0] + kt * dilation_[0]] = 1;
      for (int64_t h = 0; h < p.out[1]; ++h)
        for (int64_t kh = 0; kh < kernel_[1]; ++kh) p.need_h[h * stride_[1] + kh * dilation_[1]] = 1;
    }
    return plans_.emplace(shape, std::move(p)).first->second;
  }

  void fill_padded(const at::Tensor& x, Plan& p) const {
    const int64_t n = x.size(0), t = x.size(2), h = x.size(3), w = x.size(4);
    const int64_t row = p.row, row_b = p.row_b, plane = p.plane, block = p.block;
    const float* src = x.data_ptr<float>();
    float* dst = p.padded.data_ptr<float>();
    const int64_t s = p.phases, pw = padding_[2];
    at::parallel_for(0, n * in_channels_ * t, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t nc = i / t, tt = i % t;
        if (!p.need_t[tt + padding_[0]]) continue;
        for (int64_t hh = 0; hh < h; ++hh) {
          if (!p.need_h[hh + padding_[1]]) continue;
          const float* in = src + (i * h + hh) * w;
          float* out = dst + (nc / cb_) * block + (nc % cb_) * row + (tt + padding_[0]) * plane +
                       (hh + padding_[1]) * row_b;
          if (s == 1) {
            std::memcpy(out + pw, in, w * sizeof(float));
            continue;
          }
          for (int64_t phase = 0; phase < s; ++phase) {     // padded column phase + j * s -> phase row, j
            float* to = out + phase * p.wq;
            for (int64_t j = std::max<int64_t>(0, (pw - phase + s - 1) / s); phase + j * s - pw < w; ++j)
              to[j] = in[phase + j * s - pw];
          }
        }
      }
    });
  }

  void compute(const Plan& p, float* y, const float* input) const {
    const float* x = in_place_ ? input : p.padded.data_ptr<float>();
    // Output plane t reads input plane t * stride + kt * dilation - padding with kernel plane kt, if it exists
    // (otherwise the padding: the tiles of such planes leave that kernel plane's columns out).
    const int64_t planes_in = p.block / p.plane - (in_place_ ? 0 : 2 * padding_[0]);
    const int64_t hw = p.out[1] * p.out[2], oh = p.out[1] / 2, ow = p.out[2] / 2;   // oh, ow: pooled
    const int64_t volume = pool_ ? p.out[0] * oh * ow : p.out[0] * hw;      // of one filter's output
    const int64_t row_b = p.row_b, plane = p.plane;
    const int64_t sample_in = (in_channels_ / cb_) * p.block, sample_out = out_channels_ * volume;
    const int64_t vectors = (p.out[2] + VL - 1) / VL;
    const int nv = nv_for(mr_);
    // Chunk q * planes + kt: kernel plane kt of channel range q.
    const int64_t planes = kernel_[0], ranges = p.chunks / planes;
    const float* packed = p.weights.empty() ? weights_.data() : p.weights.data();
    std::atomic<int64_t> next{0};
    const int64_t items = static_cast<int64_t>(p.items.size());
    const int64_t threads = std::min<int64_t>(at::get_num_threads(), items);
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
      std::vector<Tile> tiles;
      for (int64_t i = next++; i < items; i = next++) {
        const Item item = p.items[i];
        const int64_t r0 = item.r0;
        // The tiles of this item: its rows' vectors, NV at a time (a tile may span rows; in place, not
        // planes, whose kernel planes differ at the ends).
        tiles.clear();
        Tile t{};
        for (int64_t tt = item.t0; tt < std::min(p.out[0], item.t0 + p.tb); ++tt) {
          if (in_place_ && t.count) {
            tiles.push_back(t);
            t = Tile{};
          }
          // Pooled: a tile is the vector at one place of rows h and h + 1, pooled as it is stored (an odd
          // last row, or a row's last column, pools with nothing: left out, as nn.MaxPool3d does).
          for (int64_t hh = item.h0; pool_ && hh + 1 < std::min(p.out[1], item.h0 + p.hb); hh += 2) {
            const int64_t in = item.n * sample_in + tt * stride_[0] * plane + hh * stride_[1] * row_b;
            const int64_t out = item.n * sample_out + (tt * oh + hh / 2) * ow;
            for (int64_t v = 0; v < vectors; ++v) {
              const int pooled = static_cast<int>(std::min<int64_t>(VL, p.out[2] - v * VL) / 2);
              if (pooled == 0) continue;
              Tile pair{};
              pair.pooled = true;
              pair.plane = pair.plane_end = tt;
              pair.count = 2;
              pair.in[0] = in + v * VL;
              pair.in[1] = in + stride_[1] * row_b + v * VL;
              pair.out[0] = pair.out[1] = out + v * (VL / 2);
              pair.valid[0] = pair.valid[1] = pooled;
              tiles.push_back(pair);
            }
          }
          for (int64_t hh = item.h0; !pool_ && hh < std::min(p.out[1], item.h0 + p.hb); ++hh) {
            const int64_t in = item.n * sample_in + tt * stride_[0] * plane + hh * stride_[1] * row_b;
            const int64_t out = item.n * sample_out + tt * hw + hh * p.out[2];
            for (int64_t v = 0; v < vectors; ++v) {
              if (t.count == 0) t.plane = tt;
              t.plane_end = tt;
              t.in[t.count] = in + v * VL;
              t.out[t.count] = out + v * VL;
              t.valid[t.count] = static_cast<int>(std::min<int64_t>(VL, p.out[2] - v * VL));
              if (++t.count == nv) {
                tiles.push_back(t);
                t = Tile{};
              }
            }
          }
        }
        if (t.count) tiles.push_back(t);
        const int64_t last_block_row = std::min<int64_t>(row_start_.size() - 1, r0 + p.block_rows_per_item);
        // The item's outputs, fetched for writing (into L2) as it starts: the tiles of a block row's first
        // chunk store to cold lines, and took 10-25% longer per kept column than the later chunks' tiles.
        // 0.99-1.07x on C3D's convs in three interleaved runs (1.03-1.05 in the longest).
        for (int64_t f = r0 * gm_; f < std::min(out_channels_, last_block_row * gm_); ++f)
          for (const Tile& tile : tiles)
            for (int j = 0; j < tile.count; ++j) prefetch_for_write(y + f * volume + tile.out[j]);
        // A block row that keeps nothing: its outputs are the bias.
        for (int64_t r = r0; r < last_block_row; ++r) {
          if (row_start_[r + 1] != row_start_[r]) continue;
          for (int64_t g = 0; g < groups_; ++g) {
            const int64_t f = r * gm_ + g * mr_;
            const int filters = static_cast<int>(std::min<int64_t>({mr_, gm_ - g * mr_, out_channels_ - f}));
            if (filters <= 0) continue;
            const float* bias = bias_.empty() ? nullptr : bias_.data() + f;
            for (const Tile& tile : tiles)
              kTiles[mr_][tile.count](x, nullptr, nullptr, 0, tile, y + f * volume, volume, filters, true, bias,
                                      nullptr, relu_);
          }
        }
        // Range by range of input channels, every block row of the item runs its columns there: in one call a
        // tile takes the range's columns of the kernel planes its output planes read (all but at the ends).
        for (int64_t q = 0; q < ranges; ++q) {
          for (int64_t r = r0; r < last_block_row; ++r) {
            const int64_t* starts = p.chunk_start.data() + r * (p.chunks + 1);
            const int64_t u0 = row_start_[r], width = row_start_[r + 1] - u0;
            if (width == 0 || q < p.first_range[r] || q > p.last_range[r]) continue;
            const bool first = q == p.first_range[r];            // the block row's first range with columns
            const bool relu = relu_ && q == p.last_range[r];     // writes, and its last applies the ReLU
            for (size_t ti = 0; ti < tiles.size(); ++ti) {
              const Tile& tile = tiles[ti];
              int64_t lo = planes, hi = -1;           // kernel planes that read the input at some output plane
              for (int64_t kt = 0; kt < planes; ++kt) {   // of the tile (a range: padding lies at the ends)
                for (int64_t o = tile.plane; o <= tile.plane_end; ++o) {
                  const int64_t plane_in = o * stride_[0] + kt * dilation_[0] - padding_[0];
                  if (plane_in >= 0 && plane_in < planes_in) {
                    lo = std::min(lo, kt);
                    hi = kt;
                  }
                }
              }
              const int64_t a = hi < lo ? 0 : starts[q * planes + lo], b = hi < lo ? 0 : starts[q * planes + hi + 1];
              if (a == b && !first && !relu) continue;     // nothing to add (a bias or a ReLU to store: go on)
              const bool ahead = ti + 1 < tiles.size() && vectors >= nv &&
                                 (!in_place_ || tiles[ti + 1].plane == tile.plane);
              for (int64_t g = 0; g < groups_; ++g) {
                const int64_t f = r * gm_ + g * mr_;
                const int filters = static_cast<int>(std::min<int64_t>({mr_, gm_ - g * mr_, out_channels_ - f}));
                if (filters <= 0) continue;
                const float* bias = bias_.empty() ? nullptr : bias_.data() + f;
                kTiles[mr_][tile.count](x, p.offsets.data() + a, packed + (u0 * groups_ + g * width + a - u0) * mr_,
                                        b - a, tile, y + f * volume, volume, filters, first, bias,
                                        g == 0 && ahead ? &tiles[ti + 1] : nullptr, relu);
              }
            }
          }
        }
      }
    });
  }

  int64_t out_channels_ = 0, in_channels_ = 0, kernel_[3] = {1, 1, 1};
  std::vector<int64_t> stride_, padding_, dilation_;
  int64_t gm_ = 1, groups_ = 1, cb_ = 1;
  bool in_place_ = false;        // reads the input where it lies (kernels of 1 x 1 in H and W, see above)
  int mr_ = 1;
  bool relu_ = false;            // the ReLU after the conv, applied as the outputs are stored
  bool pool_ = false;            // and then a 2x2 max pool in H and W (stride 2): a quarter of the outputs stored
  std::vector<int64_t> columns_, row_start_;
  std::vector<float> weights_, bias_;
  std::map<std::vector<int64_t>, Plan> plans_;
  at::Tensor last_;              // the last output, used again once the caller has let it go
  int64_t last_bytes_ = 0;       // its bytes, counted in g_kept_bytes
  std::mutex lock_;
};

// Max pooling without indices (PyTorch's CPU max_pool3d computes them even for inference, and spends
// about ten times a pass over memory on C3D's pool1). Separably, each step along contiguous rows (the
// compiler vectorises them): per output plane, the max over the kernel's T planes of every input row
// the plane's outputs read; per output row, the max of those over the kernel's H rows into one row;
// then the windows along W, one kernel column at a time. A 3x3x3 pool at stride 1 (S3D's inception
// branches) takes 3 + 3 + 3 maxima per output this way, not 27, and none of them scalar. NaN wins, as in
// PyTorch. Padding only ever widens windows that hold at least one input element.
inline void max_into(float* __restrict to, const float* __restrict from, int64_t n) {
  for (int64_t j = 0; j < n; ++j) to[j] = nan_max(to[j], from[j]);
}

at::Tensor max_pool3d(at::Tensor x, std::vector<int64_t> kernel, std::vector<int64_t> stride,
                      std::vector<int64_t> padding, std::vector<int64_t> dilation) {
  TORCH_CHECK(x.dim() == 5 && x.device().is_cpu() && x.scalar_type() == at::kFloat,
              "max_pool3d: (N, C, T, H, W) float32 CPU input expected, got ", x.sizes());
  x = x.contiguous();
  const int64_t nc = x.size(0) * x.size(1), size[3] = {x.size(2), x.size(3), x.size(4)};
  int64_t out[3];
  for (int d = 0; d < 3; ++d) {
    out[d] = (size[d] + 2 * padding[d] - dilation[d] * (kernel[d] - 1) - 1) / stride[d] + 1;
    TORCH_CHECK(out[d] >= 1, "max_pool3d: input ", x.sizes(), " is smaller than the kernel");
  }
  auto y = at::empty({x.size(0), x.size(1), out[0], out[1], out[2]}, x.options());
  const float* src = x.data_ptr<float>();
  float* dst = y.data_ptr<float>();
  const int64_t h_in = size[1], w = size[2];
  const float lowest = -std::numeric_limits<float>::infinity();
  // The row buffer holds -inf in W's padding on both sides: windows need no bounds checks.
  const int64_t pw = padding[2], width = std::max(w + 2 * pw, (out[2] - 1) * stride[2] + (kernel[2] - 1) * dilation[2] + 1);
  const int64_t sw = stride[2], dw = dilation[2];
  const bool pairs = kernel[2] == 2 && sw == 2 && dw == 1;
  // Input rows of an input plane that some output row reads (strides over the kernel skip some).
  std::vector<char> need_h(h_in, 0);
  for (int64_t h = 0; h < out[1]; ++h)
    for (int64_t kh = 0; kh < kernel[1]; ++kh) {
      const int64_t hi = h * stride[1] - padding[1] + kh * dilation[1];
      if (hi >= 0 && hi < h_in) need_h[hi] = 1;
    }
  // The max over the kernel's T planes first pays where output rows share input rows (3x3x3 at stride
  // 1); where they do not (C3D's 2x2x2 at stride 2) the rows go into each output row directly.
  const bool planes_first = kernel[0] > 1 && (kernel[1] - 1) * dilation[1] + 1 > stride[1];
  at::parallel_for(0, nc * out[0], 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(width, lowest), merged(planes_first ? h_in * w : 0);
    std::vector<const float*> sources;     // input planes of the output plane (or their merged max)
    float* line = buffer.data() + pw;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t plane = i / out[0], t = i % out[0];
      sources.clear();
      for (int64_t kt = 0; kt < kernel[0]; ++kt) {
        const int64_t ti = t * stride[0] - padding[0] + kt * dilation[0];
        if (ti >= 0 && ti < size[0]) sources.push_back(src + (plane * size[0] + ti) * h_in * w);
      }
      if (planes_first && sources.size() > 1) {
        for (int64_t hi = 0; hi < h_in; ++hi) {
          if (!need_h[hi]) continue;
          float* to = merged.data() + hi * w;
          std::memcpy(to, sources[0] + hi * w, w * sizeof(float));
          for (size_t q = 1; q < sources.size(); ++q) max_into(to, sources[q] + hi * w, w);
        }
        sources.assign(1, merged.data());
      }
      for (int64_t h = 0; h < out[1]; ++h) {
        bool any = false;
        for (int64_t kh = 0; kh < kernel[1]; ++kh) {
          const int64_t hi = h * stride[1] - padding[1] + kh * dilation[1];
          if (hi < 0 || hi >= h_in) continue;
          for (const float* from : sources) {
            if (!any) std::memcpy(line, from + hi * w, w * sizeof(float));
            else max_into(line, from + hi * w, w);
            any = true;
          }
        }
        if (!any) std::fill(line, line + w, lowest);
        float* o = dst + (i * out[1] + h) * out[2];
        const float* first = buffer.data();
        if (pairs) {   // C3D's pools, windows of 2 at stride 2: one pass, 1.3x the stride-2 loop below
          for (int64_t j = 0; j < out[2]; ++j) o[j] = nan_max(first[2 * j], first[2 * j + 1]);
          continue;
        }
        // Window by window the maxima would be scalar: kernel column by kernel column, across the row.
        if (sw == 1) {
          std::memcpy(o, first, out[2] * sizeof(float));
          for (int64_t kw = 1; kw < kernel[2]; ++kw) max_into(o, first + kw * dw, out[2]);
        } else {
          for (int64_t j = 0; j < out[2]; ++j) o[j] = first[j * sw];
          for (int64_t kw = 1; kw < kernel[2]; ++kw) {
            const float* shifted = first + kw * dw;
            if (sw == 2) {
              for (int64_t j = 0; j < out[2]; ++j) o[j] = nan_max(o[j], shifted[2 * j]);
            } else {
              for (int64_t j = 0; j < out[2]; ++j) o[j] = nan_max(o[j], shifted[j * sw]);
            }
          }
        }
      }
    }
  });
  return y;
}

// Threads at::parallel_for gives this extension: torch.get_num_threads() where it is built with OpenMP,
// 1 where not (then every parallel loop above runs on one thread).
int64_t parallel_threads() {
  const int64_t wanted = at::get_num_threads();
  std::vector<std::atomic<int>> seen(wanted);
  // every thread of an OpenMP team runs its share; without OpenMP the calling thread runs it all
  at::parallel_for(0, wanted, 1, [&](int64_t, int64_t) { seen[at::get_thread_num()] = 1; });
  int64_t count = 0;
  for (auto& s : seen) count += s.load();
  return count;
}

// Register-only FMA loop: 12 independent accumulators cover the FMA latency (4-5 cycles) at two
// FMAs per cycle; returns GMAC/s over `threads` threads (best of `repeats`).
constexpr int64_t kPeakIterations = 4 << 20;

double fma_peak_gmacs(int64_t threads, int64_t repeats) {
  const int64_t iterations = kPeakIterations;
  auto body = [iterations](float* sink) {
    vec acc[12];
    for (int i = 0; i < 12; ++i) acc[i] = vset(1.f + i * 1e-3f);
    const vec a = vset(0.999999f), b = vset(1e-7f);
    for (int64_t it = 0; it < iterations; ++it) {
      UNROLL
      for (int i = 0; i < 12; ++i) acc[i] = vfma(acc[i], a, b);
    }
    vec s = acc[0];
    for (int i = 1; i < 12; ++i) s = vfma(acc[i], vset(1.f), s);
    float out[VL];
    vstore(out, s);
    *sink = out[0];
  };
  double best = 0;
  std::vector<float> sinks(threads);
  // On the threads the kernel runs on (OpenMP's, shared with PyTorch) where they are the ones asked
  // for: fresh threads would compete with OpenMP's, which spin a while after each parallel region.
  const bool pool = parallel_threads() == threads;
  for (int64_t rep = 0; rep < repeats; ++rep) {
    const auto start = std::chrono::steady_clock::now();
    if (pool) {
      at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) body(&sinks[t]);
      });
    } else {
      std::vector<std::thread> threads_run;
      for (int64_t t = 0; t < threads; ++t) threads_run.emplace_back(body, &sinks[t]);
      for (auto& th : threads_run) th.join();
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best = std::max(best, double(threads) * iterations * 12 * VL / seconds / 1e9);
  }
  return best;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("isa") = ISA;
  m.attr("lanes") = VL;
  m.attr("fma_loop_macs") = kPeakIterations * 12 * VL;    // one thread's MACs in one run of the peak loop
  m.def("fma_peak_gmacs", &fma_peak_gmacs, "measured FMA throughput, GMAC/s", py::arg("threads"),
        py::arg("repeats") = 3);
  m.def("kept_output_bytes", [] { return g_kept_bytes.load(); }, "bytes of output buffers the kernels keep now");
  m.def("keep_outputs_up_to", &keep_outputs_up_to, "at most this many bytes of output buffers kept between "
        "calls, all kernels together; returns the previous bound", py::arg("bytes"));
  m.def("parallel_threads", &parallel_threads, "threads the kernel's parallel loops run on",
        py::call_guard<py::gil_scoped_release>());
  m.def("max_pool3d", &max_pool3d, "max pooling without indices", py::arg("x"), py::arg("kernel"),
        py::arg("stride"), py::arg("padding"), py::arg("dilation"), py::call_guard<py::gil_scoped_release>());
  py::class_<KGSKernel>(m, "KGSKernel")
      .def(py::init<at::Tensor, std::optional<at::Tensor>, int64_t, std::vector<int64_t>, std::vector<int64_t>,
                    std::vector<int64_t>, bool, bool>(),
           py::arg("weight"), py::arg("bias"), py::arg("block_rows"), py::arg("stride"), py::arg("padding"),
           py::arg("dilation"), py::arg("relu") = false, py::arg("pool") = false)
      .def("forward", &KGSKernel::forward, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("kept_columns", &KGSKernel::kept_columns)
      .def_property_readonly("kept_weights", &KGSKernel::kept_weights);
}
