// Multi-head latent attention (MLA, DeepSeek-V2/V3) in its absorbed decode form, the kernel behind `mla`, `tp-mla`
// and `tpla`.
//
// Cache per token: the latent c_t (d_c) and a RoPE key k_r,t (d_r) shared by every head. Per query t and head h:
// the absorbed query q_c (d_c) and RoPE query q_r (d_r);
//   s_t,h,j = scale (q_c · c_j + q_r · k_r,j),  p = softmax_j(s),  z_t,h = Σ_j p_j c_j (d_c),  o_t,h = z_t,h W_UV,h (d_v).
// That is one multi-query attention whose keys are the rows [c | k_r] and whose values are the first d_c columns of
// the same rows, so the kernel keeps the cache as one (L x (d_c + d_r)) matrix and stacks every (query, head) pair
// as a row of one (T*H x (d_c + d_r)) query matrix: the blockwise softmax kernel then reads the cache once per step
// (per 128 query rows), not once per head. The up-projection is one gemm per head on z's strided rows.
// TPLA runs the same kernel on a slice of the latent columns (its cache is [c[:, slice] | k_r]).
// Precision: the cache is a `LatentCache`, fp32 or packed bf16 (UInt16, 2 bytes an element: decode reads the whole
// cache once per step, so half the bytes is the speed-up where the step is bound by memory). bf16: the cache and the
// query rows are bf16 operands of the blockwise kernel's bf16 path (SoftmaxAttentionBF16.swift: scores, softmax
// statistics and z accumulated in fp32, P rounded for P V); z and the up-projection z W_UV stay fp32 (OpenBLAS): o is
// a partial output that TPLA sums across ranks in fp32, and W_UV is a weight, not the cache.

/// Sizes of one latent-attention problem.
public struct LatentShape: Sendable, Equatable, Codable, CustomStringConvertible {
    /// Cached tokens L, query tokens T, heads H, latent d_c, RoPE d_r, value d_v.
    public var seqLen: Int, queries: Int, heads: Int, latentDim: Int, ropeDim: Int, vDim: Int

    public init(seqLen: Int, queries: Int = 1, heads: Int, latentDim: Int, ropeDim: Int, vDim: Int) {
        (self.seqLen, self.queries, self.heads, self.latentDim, self.ropeDim, self.vDim) = (seqLen, queries, heads, latentDim, ropeDim, vDim)
    }

    public func validate() throws {
        for (name, value) in [("seq-len", seqLen), ("queries", queries), ("heads", heads), ("latent-dim", latentDim), ("v-dim", vDim)] where value < 1 {
            throw SeqParError.invalidInput("--\(name) is \(value); it must be at least 1")
        }
        guard ropeDim >= 0 else { throw SeqParError.invalidInput("--rope-dim is \(ropeDim); it must be 0 or more") }
    }

    /// The default softmax scale: 1 / sqrt(d_c + d_r), the head dimension of the absorbed keys.
    public var defaultScale: Float { 1 / Float(latentDim + ropeDim).squareRoot() }
    public var description: String { "L=\(seqLen) T=\(queries) H=\(heads) d_c=\(latentDim) d_r=\(ropeDim) d_v=\(vDim)" }
}

/// The global inputs: latent (L, d_c), ropeK (L, d_r), qLatent (T, H, d_c), qRope (T, H, d_r), wUV (H, d_c, d_v).
public struct LatentInputs: @unchecked Sendable {
    public var latent: Tensor, ropeK: Tensor, qLatent: Tensor, qRope: Tensor, wUV: Tensor
    public var shape: LatentShape {
        LatentShape(seqLen: latent.shape[0], queries: qLatent.shape[0], heads: qLatent.shape[1], latentDim: latent.shape[1],
                    ropeDim: ropeK.shape[1], vDim: wUV.shape[2])
    }

    public init(latent: Tensor, ropeK: Tensor, qLatent: Tensor, qRope: Tensor, wUV: Tensor) {
        (self.latent, self.ropeK, self.qLatent, self.qRope, self.wUV) = (latent, ropeK, qLatent, qRope, wUV)
    }

    /// Seeded inputs, the same on every rank: N(0, 1) cache and queries, W_UV ~ N(0, 1/d_c). With `outliers` > 0,
    /// that many latent channels (every (d_c / outliers)-th) are scaled by `outlierScale` in the cache and queries,
    /// the uneven channels trained MLA caches show.
    public static func seeded(_ s: LatentShape, seed: UInt64, outliers: Int = 0, outlierScale: Float = 20) -> LatentInputs {
        func make(_ stream: UInt64, _ shape: [Int], scale: Float = 1) -> Tensor {
            let rng = CounterRandom(seed: seed, stream: stream)
            let t = Tensor(uninitialized: shape)
            for i in 0..<t.count { t.pointer[i] = rng.normal(i) * scale }
            return t
        }
        let x = LatentInputs(latent: make(20, [s.seqLen, s.latentDim]), ropeK: make(21, [s.seqLen, s.ropeDim]),
                             qLatent: make(22, [s.queries, s.heads, s.latentDim]), qRope: make(23, [s.queries, s.heads, s.ropeDim]),
                             wUV: make(24, [s.heads, s.latentDim, s.vDim], scale: 1 / Float(s.latentDim).squareRoot()))
        if outliers > 0 {
            let stride = max(s.latentDim / outliers, 1)
            for channel in Swift.stride(from: 0, to: s.latentDim, by: stride).prefix(outliers) {
                for t in [x.latent, x.qLatent] {
                    for row in 0..<(t.count / s.latentDim) { t.pointer[row * s.latentDim + channel] *= outlierScale }
                }
            }
        }
        return x
    }
}

/// A latent cache: `rows` rows of [c | k_r] (`cols` columns), stored in fp32 or packed bf16 (UInt16). A view of some
/// rows shares the storage. Not synchronised: one writer at a time.
public struct LatentCache: @unchecked Sendable {
    public let precision: Precision
    public let rows: Int, cols: Int
    /// fp32 storage (rows, cols), or nil in bf16.
    let values: Tensor?
    /// bf16 storage, row 0 at element `offset`, or nil in fp32.
    let packed: BF16Buffer?
    let offset: Int

    /// A zero-filled cache.
    public init(rows: Int, cols: Int, precision: Precision) {
        (self.precision, self.rows, self.cols, self.offset) = (precision, rows, cols, 0)
        if precision == .bf16 {
            let b = BF16Buffer(capacity: rows * cols)
            b.base.initialize(repeating: 0, count: rows * cols)
            (values, packed) = (nil, b)
        } else {
            (values, packed) = (Tensor(zeros: [rows, cols]), nil)
        }
    }

    /// `t` (rows, cols) as a cache: the tensor itself in fp32 (no copy), its values rounded into packed bf16 in bf16.
    public init(_ t: Tensor, precision: Precision) {
        precondition(t.rank == 2, "a latent cache is (rows, cols), got \(t.shape)")
        if precision == .fp32 {
            self.init(precision: .fp32, rows: t.shape[0], cols: t.shape[1], values: t, packed: nil, offset: 0)
        } else {
            self.init(rows: t.shape[0], cols: t.shape[1], precision: .bf16)
            t.convertToBF16(packed!.base)
        }
    }

    init(precision: Precision, rows: Int, cols: Int, values: Tensor?, packed: BF16Buffer?, offset: Int) {
        (self.precision, self.rows, self.cols, self.values, self.packed, self.offset) = (precision, rows, cols, values, packed, offset)
    }

    /// Bytes the cache holds (and a decode step reads).
    public var bytes: Int { rows * cols * precision.operandBytes }

    /// Rows `range`, sharing storage.
    public func rows(_ range: Range<Int>) -> LatentCache {
        precondition(range.lowerBound >= 0 && range.upperBound <= rows, "rows \(range) of a \(rows)-row cache")
        return LatentCache(precision: precision, rows: range.count, cols: cols, values: values?.rows(range), packed: packed,
                           offset: offset + range.lowerBound * cols)
    }

    /// The fp32 storage as a matrix (fp32 caches only).
    public var matrix: Matrix {
        guard let values else { preconditionFailure("an fp32 view of a bf16 cache") }
        return Matrix(base: values.pointer, rows: rows, cols: cols)
    }

    /// The packed storage as a matrix (bf16 caches only).
    public var bf16: BF16Matrix {
        guard let packed else { preconditionFailure("a bf16 view of an fp32 cache") }
        return BF16Matrix(base: packed.base + offset, rows: rows, cols: cols)
    }

    /// Stores `count` values at (row, column...), rounded to bf16 in a bf16 cache.
    public func write(row: Int, column: Int, _ src: UnsafePointer<Float>, count: Int) {
        precondition(row >= 0 && row < rows && column >= 0 && column + count <= cols)
        if let values {
            (values.pointer + row * cols + column).update(from: src, count: count)
        } else {
            BF16.convert(src, to: bf16.base + row * cols + column, count)
        }
    }

    /// The values as an fp32 tensor (rows, cols): a copy, widened exactly from bf16.
    public func toTensor() -> Tensor {
        if let values { return values.copy() }
        let t = Tensor(uninitialized: [rows, cols])
        BF16.convert(bf16.base, to: t.pointer, rows * cols)
        return t
    }
}

public enum LatentAttention {
    /// [a | b] row by row: (rows, ca) and (rows, cb) into (rows, ca + cb).
    public static func concatenate(_ a: Matrix, _ b: Matrix) -> Tensor {
        precondition(a.rows == b.rows)
        let out = Tensor(uninitialized: [a.rows, a.cols + b.cols])
        for r in 0..<a.rows {
            (out.pointer + r * (a.cols + b.cols)).update(from: a.base + r * a.ld, count: a.cols)
            (out.pointer + r * (a.cols + b.cols) + a.cols).update(from: b.base + r * b.ld, count: b.cols)
        }
        return out
    }

    /// o (T, H, d_v) for `heads` heads: `queries` (T*H rows, row t*H + h, of [q_c | q_r]) against `cache` (L rows
    /// of [c | k_r]), the first `latentCols` columns of the cache as values, then z_h W_UV,h with `wUV(h)` a
    /// (latentCols x d_v) view.
    public static func attend(queries: Matrix, cache: Matrix, latentCols: Int, heads: Int, wUV: (Int) -> Matrix, vDim: Int, scale: Float) -> Tensor {
        precondition(queries.cols == cache.cols && queries.rows % heads == 0)
        let z = Tensor(zeros: [queries.rows, latentCols])
        let lse = UnsafeMutablePointer<Float>.allocate(capacity: max(queries.rows, 1))
        defer { lse.deallocate() }
        SoftmaxAttention.forward(q: queries, k: cache, v: cache.cols(0..<latentCols),
                                 windows: KeyWindows(rows: queries.rows, allOf: cache.rows), scale: scale,
                                 into: z.matrix, lse: lse, scratch: SoftmaxAttention.Scratch())
        return upProject(z, heads: heads, wUV: wUV, vDim: vDim)
    }

    /// The same over a bf16 cache: the query rows rounded to bf16, the kernel's bf16 path (`OneDNN.require()` must
    /// have succeeded), z and the up-projection in fp32.
    public static func attend(queries: Matrix, cache: BF16Matrix, latentCols: Int, heads: Int, wUV: (Int) -> Matrix, vDim: Int, scale: Float) -> Tensor {
        precondition(queries.cols == cache.cols && queries.rows % heads == 0)
        let z = Tensor(zeros: [queries.rows, latentCols])
        let lse = UnsafeMutablePointer<Float>.allocate(capacity: max(queries.rows, 1))
        defer { lse.deallocate() }
        let scratch = SoftmaxAttention.BF16Scratch()
        let q = BF16.convert(queries, into: scratch.q.reserve(queries.rows * queries.cols))
        let windows = KeyWindows(rows: queries.rows, allOf: cache.rows)
        SoftmaxAttention.forwardBF16(q: q, k: cache, v: cache.cols(0..<latentCols), tiles: SoftmaxAttention.queryTiles(windows)[...], windows: windows,
                                     scale: scale, into: z.matrix, lse: lse, scratch: scratch, progress: {})
        return upProject(z, heads: heads, wUV: wUV, vDim: vDim)
    }

    /// o (T, H, d_v) = z_h W_UV,h per head, z (T*H rows, row t*H + h), in fp32.
    static func upProject(_ z: Tensor, heads: Int, wUV: (Int) -> Matrix, vDim: Int) -> Tensor {
        let (tokens, latentCols) = (z.shape[0] / heads, z.shape[1])
        let o = Tensor(zeros: [tokens, heads, vDim])
        for h in 0..<heads {
            let zh = Matrix(base: z.pointer + h * latentCols, rows: tokens, cols: latentCols, ld: heads * latentCols)
            BLAS.gemm(zh, wUV(h), into: Matrix(base: o.pointer + h * vDim, rows: tokens, cols: vDim, ld: heads * vDim))
        }
        return o
    }
}
