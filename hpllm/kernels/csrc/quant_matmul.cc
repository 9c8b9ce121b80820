// CPU matmuls with float32 or quantized weights, as XLA FFI custom calls, on gemm.h's core.
//
//   y (..., M, N) f32 = x (..., M, K) f32 @ W^T, W (..., N, K):
//   HpllmF32Matmul:  float32 W (N, K)
//   HpllmInt8Matmul: int8 codes q (N, K), one f32 scale per row (N):   W = q * scale
//   HpllmInt4Matmul: int4 codes packed two per byte (N, Kp / 2) as hpllm's pack_int4 packs
//                    them (even k in the low nibble, codes stored + 8), one f32 scale per
//                    group of `group_size` inputs (N, Kp / group_size); K <= Kp, padding
//                    codes are never read.
//   HpllmInt8MatmulVnni: HpllmInt8Matmul with x quantized to int8 per block (gemm.h's
//                    prepare_x) and int8 x int8 dot products; only where VNNI is compiled in.
//
// Why: XLA:CPU converts a whole int8 matrix to a fresh f32 buffer before its dot, so a
// quantized decode step moved more bytes than the f32 one. gemm.h reads each weight row once
// per call, converts it in registers and multiplies it against all M rows of x (tiled), so the
// bytes read per step really shrink; for many rows (prefill) it converts panels of rows once.
//
// Leading (batch) axes come from vmap (vmap_method="expand_dims"): each of x, W, scale has
// the output's batch axes, of the same size or 1 (broadcast); a weight shared by the whole
// batch folds the batch into M. Rows of W are split into chunks that the calling thread and
// (num_threads - 1) tasks on XLA's intra-op thread pool claim with an atomic counter.
//
// HpllmMatmulBlock: a plain C entry to gemm.h's matmul_block (sub-ranges of rows, strides,
// accumulate), for the tests through ctypes.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "gemm.h"
#include "parallel_chunks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// ----------------------------------------------------------------------------- threading

constexpr int64_t kChunkBytes = 64 << 10;  // weight bytes per claimed chunk (L2-resident)
// Below this much work (weight bytes x ceil(M / 4)) the call runs on the calling thread: a
// pool task's wake-up is worth it from ~2 chunks. Measured on the 2-core machine with a
// second job on it (docs/perf/quantization.md): splitting from 96 KB made int8 decode
// ~15 % faster than from 384 KB or 2 MB at load ~1.5, ~20 % slower than one thread at load 3+.
constexpr int64_t kSerialWork = 96 << 10;

// ------------------------------------------------------------------ shapes and dispatch

// Leading (batch) axes of an argument against the output's: each the same size or 1.
struct Batch {
  std::vector<int64_t> out;  // the output's batch shape
  // per argument and batch axis: elements per step along the axis (0: broadcast)
  std::vector<std::vector<int64_t>> strides;

  int64_t size() const {
    int64_t n = 1;
    for (int64_t d : out) n *= d;
    return n;
  }
  int64_t Offset(int arg, int64_t b) const {  // element offset of argument `arg` at batch b
    int64_t offset = 0;
    for (int64_t i = static_cast<int64_t>(out.size()) - 1; i >= 0; --i) {
      offset += (b % out[i]) * strides[arg][i];
      b /= out[i];
    }
    return offset;
  }
  bool Broadcast(int arg) const {  // is argument `arg` the same for every batch index
    for (int64_t s : strides[arg])
      if (s != 0) return false;
    return true;
  }
};

template <typename Dims>
std::string ShapeString(const Dims& dims) {
  std::string s = "(";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + ")";
}

// Checks that argument `dims` has `trailing` non-batch axes after the output's batch axes,
// each batch axis equal to the output's or 1; appends its strides.
template <typename Dims>
ffi::Error AddBatchArg(Batch& batch, const char* name, const Dims& dims, int trailing) {
  const size_t rank = batch.out.size();
  if (dims.size() != rank + trailing)
    return ffi::Error::InvalidArgument(std::string(name) + " " + ShapeString(dims) + " needs " +
                                       std::to_string(rank + trailing) + " axes");
  int64_t step = 1;
  for (size_t i = rank; i < dims.size(); ++i) step *= dims[i];
  std::vector<int64_t> strides(rank);
  for (int64_t i = static_cast<int64_t>(rank) - 1; i >= 0; --i) {
    if (dims[i] != batch.out[i] && dims[i] != 1)
      return ffi::Error::InvalidArgument(std::string(name) + " " + ShapeString(dims) +
                                         ": batch axes must match the output's or be 1");
    strides[i] = dims[i] == 1 ? 0 : step;
    step *= dims[i];
  }
  batch.strides.push_back(std::move(strides));
  return ffi::Error::Success();
}

// Runs rows_fn(batch, n0, n1) over every batch index and all N weight rows, in chunks of
// rows: ~kChunkBytes of weights for few rows of x, one converted panel (gemm.h) for many.
template <typename RowsFn>
void ForEachRowChunk(ffi::ThreadPool& pool, int64_t batches, int64_t N, int64_t M, int64_t K,
                     int64_t row_bytes, bool panels, const RowsFn& rows_fn) {
  if (batches == 0 || N == 0 || M == 0) return;
  row_bytes = std::max<int64_t>(row_bytes, 1);
  const int64_t work = batches * N * row_bytes * ((M + 3) / 4);
  int64_t rows = std::max<int64_t>(8, kChunkBytes / row_bytes / 8 * 8);
  if (panels && M > hpllm::gemm_detail::kDirectRows)  // whole strip pairs of 32 rows (gemm.h)
    rows = std::max<int64_t>(32, hpllm::gemm_detail::PanelRows(K) / 32 * 32);
  const int64_t per_batch = (N + rows - 1) / rows;
  auto run_chunk = [&rows_fn, rows, per_batch, N](int64_t c) {
    const int64_t n0 = (c % per_batch) * rows;
    rows_fn(c / per_batch, n0, std::min(N, n0 + rows));
  };
  if (work < kSerialWork) {
    for (int64_t c = 0; c < batches * per_batch; ++c) run_chunk(c);
    return;
  }
  hpllm::ParallelChunks(pool, batches * per_batch, run_chunk);
}

// x (..., M, K), w (..., N, ...), scale (..., N[, G]), y (..., M, N): the batch layout, or
// an error naming the bad shape. When only x has batch axes, they fold into M.
struct Problem {
  Batch batch;
  int64_t M = 0, K = 0, N = 0;
};

template <typename WDims, typename SDims>
ffi::ErrorOr<Problem> MakeProblem(ffi::Buffer<ffi::F32>& x, const WDims& w_dims,
                                  const SDims& s_dims, int scale_trailing,
                                  ffi::Result<ffi::Buffer<ffi::F32>>& y) {
  Problem p;
  auto y_dims = y->dimensions();
  auto x_dims = x.dimensions();
  if (y_dims.size() < 2 || x_dims.size() != y_dims.size())
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        "x " + ShapeString(x_dims) + " and y " + ShapeString(y_dims) +
        " must be (..., M, K) and (..., M, N)"));
  const size_t rank = y_dims.size() - 2;
  p.batch.out.assign(y_dims.begin(), y_dims.begin() + rank);
  p.M = y_dims[rank];
  p.N = y_dims[rank + 1];
  p.K = x_dims[rank + 1];
  if (x_dims[rank] != p.M)
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        "x " + ShapeString(x_dims) + " does not have y's " + std::to_string(p.M) + " rows"));
  if (auto e = AddBatchArg(p.batch, "x", x_dims, 2); e.failure()) return ffi::Unexpected(e);
  if (auto e = AddBatchArg(p.batch, "weight", w_dims, 2); e.failure())
    return ffi::Unexpected(e);
  if (auto e = AddBatchArg(p.batch, "scale", s_dims, scale_trailing); e.failure())
    return ffi::Unexpected(e);
  if (w_dims[rank] != p.N || s_dims[rank] != p.N)
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        "weight " + ShapeString(w_dims) + " and scale " + ShapeString(s_dims) + " must have y's " +
        std::to_string(p.N) + " output rows"));
  return p;
}


// Runs matmul_block per row chunk (and batch index) over the pool; `view_of(b)` is the weight
// of batch index b. x and y are float32 (..., M, K) and (..., M, N).
template <typename ViewOf>
void RunMatmul(ffi::ThreadPool& pool, const Problem& p, const float* xd, float* yd,
               int64_t row_bytes, const ViewOf& view_of, bool weight_shared) {
  int64_t M = p.M, batches = p.batch.size();
  const bool fold = weight_shared;  // one weight, batched x: the batch is more rows of x
  if (fold) M *= batches, batches = 1;
  const int64_t K = p.K, N = p.N;
  const Batch& batch = p.batch;
  ForEachRowChunk(pool, batches, N, M, K, row_bytes, true, [&](int64_t b, int64_t n0, int64_t n1) {
    const float* xb = fold ? xd : xd + batch.Offset(0, b);
    hpllm::matmul_block(xb, M, K, view_of(fold ? -1 : b), n0, n1, yd + b * M * N, N, false);
  });
}

ffi::Error F32MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                         ffi::Result<ffi::Buffer<ffi::F32>> y) {
  auto problem = MakeProblem(x, w.dimensions(), w.dimensions(), 2, y);
  if (!problem) return problem.error();
  const Problem& p = *problem;
  if (w.dimensions().back() != p.K)
    return ffi::Error::InvalidArgument("weight " + ShapeString(w.dimensions()) +
                                       " does not have x's " + std::to_string(p.K) + " inputs");
  const float* wd = w.typed_data();
  RunMatmul(pool, p, x.typed_data(), y->typed_data(), 4 * p.K, [&](int64_t b) {
    return hpllm::WeightView{hpllm::WFormat::F32, wd + (b < 0 ? 0 : p.batch.Offset(1, b)),
                             nullptr, p.N, p.K, 0};
  }, p.batch.Broadcast(1));
  return ffi::Error::Success();
}

// The problem of an int8 matmul: x (..., M, K), q (..., N, K), scale (..., N).
ffi::ErrorOr<Problem> MakeInt8Problem(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::S8>& q,
                                      ffi::Buffer<ffi::F32>& scale,
                                      ffi::Result<ffi::Buffer<ffi::F32>>& y) {
  auto problem = MakeProblem(x, q.dimensions(), scale.dimensions(), 1, y);
  if (problem && q.dimensions().back() != problem->K)
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        "int8 weight " + ShapeString(q.dimensions()) + " does not have x's " +
        std::to_string(problem->K) + " inputs"));
  return problem;
}

// An int8 matmul on x prepared once per call (prepare(x, rows, K, ldx, scratch), `row_bytes`
// per row), then block(px, M, view, n0, n1, y, ldy, accumulate) per row chunk.
template <typename Prepare, typename Block>
ffi::Error RunInt8Prepared(ffi::ThreadPool& pool, const Problem& p, ffi::Buffer<ffi::F32>& x,
                           const int8_t* qd, const float* sd,
                           ffi::Result<ffi::Buffer<ffi::F32>>& y, int64_t row_bytes,
                           const Prepare& prepare, const Block& block) {
  // x is quantized once per call, on the calling thread (M x K: small beside the weights).
  const int64_t rows = p.K > 0 ? static_cast<int64_t>(x.element_count()) / p.K : 0;
  std::vector<uint8_t> px(static_cast<size_t>(rows * row_bytes));
  prepare(x.typed_data(), rows, p.K, p.K, px.data());
  int64_t M = p.M, batches = p.batch.size();
  const bool fold = p.batch.Broadcast(1) && p.batch.Broadcast(2);
  if (fold) M *= batches, batches = 1;
  float* yd = y->typed_data();
  ForEachRowChunk(pool, batches, p.N, M, p.K, p.K, false,
                  [&](int64_t b, int64_t n0, int64_t n1) {
    const int64_t row0 = fold ? 0 : p.batch.Offset(0, b) / std::max<int64_t>(p.K, 1);
    const uint8_t* xb = px.data() + row0 * row_bytes;
    const hpllm::WeightView view{hpllm::WFormat::INT8, qd + (fold ? 0 : p.batch.Offset(1, b)),
                                 sd + (fold ? 0 : p.batch.Offset(2, b)), p.N, p.K, 0};
    block(xb, M, view, n0, n1, yd + b * M * p.N, p.N, false);
  });
  return ffi::Error::Success();
}

ffi::Error Int8MatmulVnniImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                              ffi::Buffer<ffi::S8> q, ffi::Buffer<ffi::F32> scale,
                              ffi::Result<ffi::Buffer<ffi::F32>> y) {
  auto problem = MakeInt8Problem(x, q, scale, y);
  if (!problem) return problem.error();
  return RunInt8Prepared(pool, *problem, x, q.typed_data(), scale.typed_data(), y,
                         hpllm::gemm_detail::PreparedRowBytes(problem->K), hpllm::prepare_x,
                         hpllm::matmul_block_prepared);
}

ffi::Error Int8MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::S8> q, ffi::Buffer<ffi::F32> scale,
                          ffi::Result<ffi::Buffer<ffi::F32>> y) {
  auto problem = MakeInt8Problem(x, q, scale, y);
  if (!problem) return problem.error();
  const Problem& p = *problem;
  const int8_t* qd = q.typed_data();
  const float* sd = scale.typed_data();
  const bool shared = p.batch.Broadcast(1) && p.batch.Broadcast(2);
  if (hpllm::gemm_detail::kI16Fast && (shared ? p.M * p.batch.size() : p.M) >=
                                          hpllm::gemm_detail::kI16MinRows) {
    // matmul_block's int8 x int16 path, x quantized once per call rather than once per chunk
    return RunInt8Prepared(pool, p, x, qd, sd, y, hpllm::gemm_detail::I16RowBytes(p.K),
                           hpllm::prepare_x16, hpllm::matmul_block_x16);
  }
  RunMatmul(pool, p, x.typed_data(), y->typed_data(), p.K, [&](int64_t b) {
    return hpllm::WeightView{hpllm::WFormat::INT8, qd + (b < 0 ? 0 : p.batch.Offset(1, b)),
                             sd + (b < 0 ? 0 : p.batch.Offset(2, b)), p.N, p.K, 0};
  }, p.batch.Broadcast(1) && p.batch.Broadcast(2));
  return ffi::Error::Success();
}

ffi::Error Int4MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::U8> packed, ffi::Buffer<ffi::F32> scale,
                          ffi::Result<ffi::Buffer<ffi::F32>> y, int64_t group_size) {
  auto problem = MakeProblem(x, packed.dimensions(), scale.dimensions(), 2, y);
  if (!problem) return problem.error();
  const Problem& p = *problem;
  const int64_t half = packed.dimensions().back(), groups = scale.dimensions().back();
  if (group_size < 2 || group_size % 2 || groups * group_size != 2 * half || p.K > 2 * half ||
      2 * half - group_size >= p.K)
    return ffi::Error::InvalidArgument(
        "int4 packed " + ShapeString(packed.dimensions()) + ", scales " +
        ShapeString(scale.dimensions()) + ", group size " + std::to_string(group_size) +
        " and K = " + std::to_string(p.K) + " do not fit: need Kp = 2 * bytes = groups * " +
        "group size (even), K padded to whole groups");
  const uint8_t* qd = packed.typed_data();
  const float* sd = scale.typed_data();
  RunMatmul(pool, p, x.typed_data(), y->typed_data(), half, [&](int64_t b) {
    return hpllm::WeightView{hpllm::WFormat::INT4, qd + (b < 0 ? 0 : p.batch.Offset(1, b)),
                             sd + (b < 0 ? 0 : p.batch.Offset(2, b)), p.N, p.K, group_size};
  }, p.batch.Broadcast(1) && p.batch.Broadcast(2));
  return ffi::Error::Success();
}

}  // namespace

extern "C" int HpllmHasVnni() { return hpllm::gemm_detail::kPreparedFast ? 1 : 0; }

// Where matmul_block multiplies by quantized x (for the tests' references): INT8 from this
// many rows of x (0: never), INT4 in groups of group_size up to this many rows (0: never).
extern "C" int64_t HpllmInt8X16MinRows() {
  return hpllm::gemm_detail::kI16Fast ? hpllm::gemm_detail::kI16MinRows : 0;
}
extern "C" int64_t HpllmInt4X8MaxRows(int64_t group_size) {
  return hpllm::gemm_detail::kI16Fast && hpllm::gemm_detail::Int4Fast(group_size)
             ? hpllm::gemm_detail::kQ4MaxRows
             : 0;
}

extern "C" void HpllmMatmulBlockPrepared(const float* x, int64_t M, int64_t ldx, const int8_t* w,
                                         const float* scale, int64_t N, int64_t K, int64_t n0,
                                         int64_t n1, float* y, int64_t ldy, int accumulate) {
  std::vector<uint8_t> px(hpllm::prepared_x_bytes(M, K));
  hpllm::prepare_x(x, M, K, ldx, px.data());
  const hpllm::WeightView view{hpllm::WFormat::INT8, w, scale, N, K, 0};
  hpllm::matmul_block_prepared(px.data(), M, view, n0, n1, y, ldy, accumulate != 0);
}

extern "C" void HpllmMatmulBlock(int fmt, const float* x, int64_t M, int64_t ldx, const void* w,
                                 const float* scale, int64_t N, int64_t K, int64_t group_size,
                                 int64_t n0, int64_t n1, float* y, int64_t ldy, int accumulate) {
  const hpllm::WeightView view{static_cast<hpllm::WFormat>(fmt), w, scale, N, K, group_size};
  hpllm::matmul_block(x, M, ldx, view, n0, n1, y, ldy, accumulate != 0);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(HpllmF32Matmul, F32MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x (..., M, K)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w (..., N, K)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y (..., M, N)
);

// Both int8 kernels (float and VNNI paths) take the same operands.
static auto Int8Binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()   // x (..., M, K)
      .Arg<ffi::Buffer<ffi::S8>>()    // q (..., N, K)
      .Arg<ffi::Buffer<ffi::F32>>()   // scale (..., N)
      .Ret<ffi::Buffer<ffi::F32>>();  // y (..., M, N)
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(HpllmInt8Matmul, Int8MatmulImpl, Int8Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(HpllmInt8MatmulVnni, Int8MatmulVnniImpl, Int8Binding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(HpllmInt4Matmul, Int4MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x (..., M, K)
                                  .Arg<ffi::Buffer<ffi::U8>>()   // packed (..., N, Kp / 2)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale (..., N, Kp / g)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y (..., M, N)
                                  .Attr<int64_t>("group_size"));
