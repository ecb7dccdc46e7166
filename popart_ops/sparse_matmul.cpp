// PopART custom op "SparseMatMul" (domain ipu_sparse, version 1): y = x W^T with W a static
// pointwise (1x1-block) sparse matrix, computed by PopSparse's static sparse-dense matmul.
//
// Inputs:  0  x       (N, K)  half or float  -- N tokens, K = cols of W
//          1  values  (nnz,)  same type      -- W's non-zero values in CSR (row-major) order;
//                                               a weight, so it lives in the initializer file
// Output:  0  y       (N, M)                 -- M = rows of W
// Attributes: pattern_path (string), pattern_hash (string, sha256 of the file), rows, cols, nnz.
//
// The sparsity pattern (row pointers + column indices) is read from pattern_path, written by
// ipu_sparse.ipu.ops.IpuSparseLinear.export_pattern (format: "IPUSPAT1", u32 version, u64 rows,
// cols, nnz, u32 row_ptr[rows+1], u32 col_idx[nnz], little endian). PopSparse compiles it into the
// program as constants; only the values are a variable. The values input is laid out by this op
// (createInput): it is a CSR-ordered *view* of the sparse operand's non-zero tensor, which PopSparse
// keeps in device order. The permutation comes from the partitioner (createSparsityDataImpl on a
// CSR matrix whose values are their own CSR positions), so host writes in CSR order land in device
// order with no copy and no second buffer.
//
// Everything that changes the compiled program (the pattern hash, shape, nnz) is appended to the
// IR hash in appendAttributes, so the executable cache never returns a program for a stale pattern.
//
// Every popart::/popsparse::/popops:: name used here is declared in the public headers of PopART
// and PopLibs 3.4 (checked by tests/ipu/test_popart_op_names.py against popart_poplibs_api.json);
// the poplar:: names it relies on are listed in popart_ops/README.md.

#include <cstdint>
#include <fstream>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <poplar/Graph.hpp>
#include <poplar/Program.hpp>
#include <poplar/Tensor.hpp>
#include <popops/Zero.hpp>
#include <popsparse/MatMul.hpp>
#include <popsparse/MatMulParams.hpp>
#include <popsparse/PlanningCache.hpp>
#include <popsparse/SparsePartitioner.hpp>
#include <popsparse/SparseStorageFormats.hpp>
#include <popsparse/SparseTensor.hpp>
#include <popsparse/codelets.hpp>

#include <popart/error.hpp>
#include <popart/names.hpp>
#include <popart/op.hpp>
#include <popart/opmanager.hpp>
#include <popart/opserialiser.hpp>
#include <popart/shapeinference.hpp>
#include <popart/popx/devicex.hpp>  // popart::popx::popType
#include <popart/popx/opx.hpp>
#include <popart/popx/opxmanager.hpp>

namespace ipu_sparse {

// PopSparse's static (compile-time pattern) API lives in popsparse::static_ (SparseTensor.hpp,
// PlanningCache.hpp); popsparse:: itself declares neither name.
using StaticSparseTensor = popsparse::static_::SparseTensor;
using StaticPlanningCache = popsparse::static_::PlanningCache;

// A domain of our own: PopART's custom-op guide says a custom op must never use ai.graphcore.
// ipu_sparse/ipu/ops.py (OP_DOMAIN, OP_NAME, OP_VERSION) must say the same.
const popart::OperatorIdentifier SparseMatMulId = {"ipu_sparse", "SparseMatMul", 1};

// ----- pattern file -----------------------------------------------------------------------

struct Pattern {
  std::size_t rows = 0, cols = 0, nnz = 0;
  std::vector<std::size_t> rowPtr, colIdx;
};

template <typename T> static T readLE(std::ifstream &f, const std::string &path) {
  T v{};
  f.read(reinterpret_cast<char *>(&v), sizeof(T)); // IPU hosts are x86-64: little endian
  if (!f)
    throw popart::error("SparseMatMul: truncated pattern file " + path);
  return v;
}

static Pattern readPattern(const std::string &path, std::size_t rows, std::size_t cols, std::size_t nnz) {
  std::ifstream f(path, std::ios::binary);
  if (!f)
    throw popart::error("SparseMatMul: cannot open pattern file " + path);
  char magic[8];
  f.read(magic, 8);
  if (!f || std::string(magic, 8) != "IPUSPAT1")
    throw popart::error("SparseMatMul: " + path + " is not a sparse pattern file");
  if (readLE<std::uint32_t>(f, path) != 1)
    throw popart::error("SparseMatMul: unsupported pattern version in " + path);
  Pattern p;
  p.rows = readLE<std::uint64_t>(f, path);
  p.cols = readLE<std::uint64_t>(f, path);
  p.nnz = readLE<std::uint64_t>(f, path);
  if (p.rows != rows || p.cols != cols || p.nnz != nnz)
    throw popart::error("SparseMatMul: " + path + " holds a " + std::to_string(p.rows) + "x" +
                        std::to_string(p.cols) + " pattern with " + std::to_string(p.nnz) +
                        " non-zeros; the op expects " + std::to_string(rows) + "x" + std::to_string(cols) +
                        " with " + std::to_string(nnz));
  p.rowPtr.resize(p.rows + 1);
  p.colIdx.resize(p.nnz);
  for (auto &v : p.rowPtr)
    v = readLE<std::uint32_t>(f, path);
  for (auto &v : p.colIdx)
    v = readLE<std::uint32_t>(f, path);
  if (p.rowPtr.back() != p.nnz)
    throw popart::error("SparseMatMul: row pointers of " + path + " do not end at nnz");
  return p;
}

// ----- Op (IR) ------------------------------------------------------------------------------

class SparseMatMulOp : public popart::Op {
public:
  SparseMatMulOp(const popart::OperatorIdentifier &opid, const popart::Op::Settings &settings,
                 std::string patternPath, std::string patternHash, int64_t rows, int64_t cols, int64_t nnz)
      : popart::Op(opid, settings), patternPath_(std::move(patternPath)), patternHash_(std::move(patternHash)),
        rows_(rows), cols_(cols), nnz_(nnz) {}

  std::unique_ptr<popart::Op> clone() const final { return std::make_unique<SparseMatMulOp>(*this); }

  void setup() final {
    const auto &x = inInfo(0);
    if (x.rank() != 2 || x.dim(1) != cols_)
      throw popart::error("SparseMatMul: x must be (N, " + std::to_string(cols_) + ")");
    if (inInfo(1).nelms() != nnz_)
      throw popart::error("SparseMatMul: values must hold " + std::to_string(nnz_) + " elements");
    outInfo(0) = popart::TensorInfo(x.dataType(), {x.dim(0), rows_});
  }

  void appendAttributes(popart::OpSerialiserBase &os) const override {
    popart::Op::appendAttributes(os);
    // The hash, not the path, decides the program: the same pattern in another file is the same program.
    os.appendAttribute("pattern_hash", patternHash_);
    os.appendAttribute("rows", rows_);
    os.appendAttribute("cols", cols_);
    os.appendAttribute("nnz", nnz_);
  }

  void appendOutlineAttributes(popart::OpSerialiserBase &os) const override {
    popart::Op::appendOutlineAttributes(os);
    os.appendAttribute("pattern_hash", patternHash_);
  }

  float getSubgraphValue() const final { return getHighSubgraphValue(); }
  bool requiresRandomSeed() const override { return false; }

  const std::string &patternPath() const { return patternPath_; }
  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }
  int64_t nnz() const { return nnz_; }

private:
  std::string patternPath_, patternHash_;
  int64_t rows_, cols_, nnz_;
};

// ----- Opx (Poplar) -------------------------------------------------------------------------

class SparseMatMulOpx : public popart::popx::Opx {
public:
  SparseMatMulOpx(popart::Op *op, popart::popx::Devicex *devicex) : popart::popx::Opx(op, devicex) {
    verifyOp<SparseMatMulOp>(op, SparseMatMulId);
  }

  popart::popx::InputCreatorType getInputCreatorType(popart::InIndex index) const override {
    return index == 1 ? popart::popx::InputCreatorType::CanCreate : popart::popx::Opx::getInputCreatorType(index);
  }

  std::set<popart::TensorId> mustExistBeforeCreate(popart::InIndex) const override { return {}; }

  poplar::Tensor createInput(popart::InIndex index, const poplar::DebugNameAndId &dnai) const override {
    if (index != 1)
      throw popart::error("SparseMatMul: only the values input can be created by the op");
    build(dnai);
    return csrView_;
  }

  void grow(poplar::program::Sequence &prog) const final {
    poplar::Tensor values = getInTensor(1);
    if (!sparse_) { // values laid out elsewhere: build the operand here and copy once per run
      build(getDebugNameAndId("values"));
      prog.add(poplar::program::Copy(values.flatten(), csrView_, false, debugContext("copyValues")));
    }
    if (padding_.valid())
      popops::zero(graph(), padding_, prog, debugContext("zeroPadding"));
    poplar::Tensor x = getInTensor(0);                                   // (N, K)
    poplar::Tensor rhs = x.transpose().expand({0});                      // (1, K, N)
    poplar::Tensor y = popsparse::static_::sparseDenseMatMul(graph(), *sparse_, rhs, prog, false, false,
                                                             debugContext("sparseDenseMatMul"), options(), &cache_);
    setOutTensor(0, y.squeeze({0}).transpose());                         // (1, M, N) -> (N, M)
  }

private:
  poplar::OptionFlags options() const {
    // PopSparse static: partials have the data type (IPU.md); the AMP comes from the IPU's plan.
    return poplar::OptionFlags{};
  }

  // Build the sparse operand from the pattern file and the CSR-ordered view of its values.
  void build(const poplar::DebugNameAndId &dnai) const {
    if (sparse_)
      return;
    const auto &op = getOp<SparseMatMulOp>();
    const std::size_t rows = op.rows(), cols = op.cols(), nnz = op.nnz();
    Pattern pat = readPattern(op.patternPath(), rows, cols, nnz);
    const std::size_t n = static_cast<std::size_t>(op.inInfo(0).dim(0));
    const poplar::Type type = popart::popx::popType(op.inInfo(0));

    // PopSparse's codelets, added to the graph this op grows into (as Graphcore's own PopSparse
    // custom op does); no process-wide record keyed by graph address, which a later graph could reuse.
    popsparse::addCodelets(graph());

    // Values = their own CSR positions (double: exact for any nnz), so the partitioner's device
    // order tells where each CSR value lives on the device.
    std::vector<double> position(nnz);
    for (std::size_t i = 0; i < nnz; ++i)
      position[i] = static_cast<double>(i);
    popsparse::CSRMatrix<double> csr(rows, cols, position, pat.colIdx, pat.rowPtr); // 1x1 blocks
    auto params = popsparse::static_::MatMulParams::createForSparseDense(1, rows, cols, n);
    sparse_ = std::make_unique<StaticSparseTensor>(popsparse::static_::createSparseDenseMatMulLHS<double>(
        graph(), type, params, csr, {dnai, "sparseLHS"}, options(), &cache_));
    popsparse::static_::Partitioner<double> partitioner(params, type, graph().getTarget(), options(), &cache_);
    const std::vector<double> deviceOrder = partitioner.createSparsityDataImpl(csr).nzValues;

    poplar::Tensor nz = sparse_->getNzValuesTensor().flatten();
    if (deviceOrder.size() != nz.numElements())
      throw popart::error("SparseMatMul: partitioner returned " + std::to_string(deviceOrder.size()) +
                          " values for a non-zero tensor of " + std::to_string(nz.numElements()));
    // devicePos[csr index] = device slot; slots that hold no CSR value are padding (zeroed).
    std::vector<std::size_t> devicePos(nnz, SIZE_MAX);
    std::vector<bool> used(deviceOrder.size(), false);
    for (std::size_t slot = 0; slot < deviceOrder.size(); ++slot) {
      const double v = deviceOrder[slot];
      if (v >= 0 && v < static_cast<double>(nnz) && v == static_cast<double>(static_cast<std::size_t>(v)) &&
          devicePos[static_cast<std::size_t>(v)] == SIZE_MAX) {
        devicePos[static_cast<std::size_t>(v)] = slot;
        used[slot] = true;
      }
    }
    for (std::size_t i = 0; i < nnz; ++i)
      if (devicePos[i] == SIZE_MAX)
        throw popart::error("SparseMatMul: non-zero " + std::to_string(i) + " has no device slot");
    // CSR-ordered view: runs of consecutive device slots become single slices.
    std::vector<poplar::Tensor> runs;
    for (std::size_t i = 0; i < nnz;) {
      std::size_t j = i + 1;
      while (j < nnz && devicePos[j] == devicePos[j - 1] + 1)
        ++j;
      runs.push_back(nz.slice(devicePos[i], devicePos[i] + (j - i)));
      i = j;
    }
    csrView_ = poplar::concat(runs);
    std::vector<poplar::Tensor> pad;
    for (std::size_t s = 0; s < used.size(); ++s)
      if (!used[s])
        pad.push_back(nz.slice(s, s + 1));
    if (!pad.empty())
      padding_ = poplar::concat(pad);
  }

  mutable std::unique_ptr<StaticSparseTensor> sparse_;
  mutable poplar::Tensor csrView_;
  mutable poplar::Tensor padding_;
  mutable StaticPlanningCache cache_;
};

// ----- registration (static creators run when the library is loaded with ctypes) -----------

namespace {
static popart::OpDefinition::DataTypes T = {popart::DataType::FLOAT16, popart::DataType::FLOAT};

static popart::OpDefinition sparseMatMulOpDef(
    {popart::OpDefinition::Inputs({{"x", T}, {"values", T}}), popart::OpDefinition::Outputs({{"y", T}}),
     popart::OpDefinition::Attributes({{"pattern_path", {"*"}},
                                       {"pattern_hash", {"*"}},
                                       {"rows", {"*"}},
                                       {"cols", {"*"}},
                                       {"nnz", {"*"}}})});

static popart::OpCreator<SparseMatMulOp> sparseMatMulOpCreator(
    popart::OpDefinitions({{SparseMatMulId, sparseMatMulOpDef}}),
    [](const popart::OpCreatorInfo &info) -> std::unique_ptr<popart::Op> {
      const auto &a = info.attributes;
      return std::make_unique<SparseMatMulOp>(
          info.opid, info.settings, a.getAttribute<popart::Attributes::String>("pattern_path"),
          a.getAttribute<popart::Attributes::String>("pattern_hash"), a.getAttribute<popart::Attributes::Int>("rows"),
          a.getAttribute<popart::Attributes::Int>("cols"), a.getAttribute<popart::Attributes::Int>("nnz"));
    },
    true);

static popart::popx::OpxCreator<SparseMatMulOpx> sparseMatMulOpxCreator({SparseMatMulId});

static popart::RegisterShapeInferenceFunction sparseMatMulShapeInference(
    SparseMatMulId, [](popart::ShapeInferenceContext &ctx) {
      const int64_t rows = ctx.getAttribute<popart::Attributes::Int>("rows");
      ctx.outInfo(0) = {ctx.inInfo(0).dataType(), {ctx.inInfo(0).dim(0), rows}};
    });
} // namespace

} // namespace ipu_sparse
