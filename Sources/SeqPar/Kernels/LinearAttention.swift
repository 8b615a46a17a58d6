// The chunkwise linear-attention kernel of one rank (unnormalised, as in LASP-2 and Lightning Attention), never an
// L x L matrix. fp32: every product through OpenBLAS (this file, the reference). bf16 (`precision: .bf16`): the same
// blocks and states with every product on oneDNN's bf16 matmul and every state kept in fp32 (LinearAttentionBF16.swift).
//
// For query head h with decay λ = λ_h in (0, 1] (1: none), over the rows of one chunk:
//   forward (causal):  out_i += Σ_{j <= i} λ^(i-j) (a_i · b_j) c_j
//   reverse:           out_i += Σ_{j >= i} λ^(j-i) (a_i · b_j) c_j
// With (a, b, c) = (q, k, v) the forward form is the attention output; the backward pass reuses both forms:
// dq = forward(dO, v, k), dk = reverse(v, dO, q), dv = reverse(k, q, dO).
//
// Tensors are (B, C, heads_x, D_x); query head h reads head h / (H / heads_x) of each operand, so GQA needs no
// copies, and an output with fewer heads than H (dk, dv) sums over the query heads that share it.
//
// Inside the chunk, blocks of `blockRows` rows: the masked intra-block product ((A B^T) ⊙ Λ) C, where
// Λ_ij = λ^(i-j) below the diagonal (forward) or λ^(j-i) above it (reverse), plus the running state of the blocks
// already passed, S (D_b x D_c), which carries them forward: S ← λ^n S + Σ_j w_j b_j^T c_j.
// Across chunks (ranks) the same two operations appear at chunk size: `state` is a chunk's S, `addStateTerm` adds
// a prefix (or suffix) state's contribution to every row. Decay powers are computed in Double and are 0 below 1e-30
// (never subnormal, never a negative power, so never inf or NaN).
//
// Packed documents (`starts`: the rows of the chunk where a document starts): no pair crosses a document, so
//   forward:  out_i += Σ_{j <= i, doc(j) = doc(i)} λ^(i-j) (a_i · b_j) c_j      (reverse likewise, j >= i)
// and the running state restarts at each start: it is replaced, not decayed, by the rows from the block's last start
// on (forward; reverse: the rows before its first start), and it reaches only the rows before a block's first start
// (reverse: after its last). A block holding a boundary keeps its shape: the cross-document entries of Λ and the
// weights of the rows outside those ranges are zeroed, so every product stays one gemm of the unchanged size (and
// the bf16 path needs no matmul primitive for a new shape). Without starts the code path is the one above, bit for
// bit. At chunk size, `state` and `addStateTerm` take the `rows` they apply to (LASP: the rows from the chunk's last
// start, the rows before its first).
// `carry` (state arithmetic, no product) is fp32 in both precisions: states are fp32 everywhere.
import Foundation

/// The feature map φ applied to queries and keys before linear attention.
public enum FeatureMap: String, CaseIterable, Codable, Sendable {
    /// φ(x) = x.
    case identity
    /// φ(x) = elu(x) + 1: x + 1 for x > 0, e^x otherwise (positive, as in "Transformers are RNNs").
    case elu1

    /// φ(x) as a new tensor, or `x` itself for the identity.
    public func apply(_ x: Tensor) -> Tensor {
        guard self == .elu1 else { return x }
        let out = Tensor(uninitialized: x.shape)
        out.pointer.update(from: x.pointer, count: x.count)
        KernelProfile.countExp(x.count)
        VectorMath.update(out.pointer, with: x.pointer, x.count) { _, v in VectorMath.exp(v).replacing(with: v + 1, where: v .> 0) }
        return out
    }

    /// `grad *= φ'(x)` in place: 1 for x > 0, e^x otherwise.
    public func backward(_ grad: Tensor, input x: Tensor) {
        guard self == .elu1 else { return }
        precondition(grad.count == x.count)
        KernelProfile.countExp(x.count)
        VectorMath.update(grad.pointer, with: x.pointer, x.count) { g, v in g * VectorMath.exp(v).replacing(with: 1, where: v .> 0) }
    }
}

public enum LinearAttention {
    /// Rows per block inside a chunk.
    public static let blockRows = 128

    public enum Direction: Sendable { case forward, reverse }

    /// λ^e as Float for each exponent; below `smallestWeight` it is 0. A weight that small changes no fp32 sum it
    /// enters, and left in, its products with the inputs are subnormal numbers, which x86 multiplies many times slower:
    /// a chunk of 12288 tokens at λ = 0.99 (weights λ^8800 ... λ^10400 subnormal in fp32) ran 3x slower on the
    /// device machine, every sgemm that took those rows crawling.
    static func powers(_ lambda: Float, _ exponents: some Sequence<Int>) -> [Float] {
        let l = Double(lambda)
        return exponents.map { e in
            let w = Foundation.pow(l, Double(e))
            return w < smallestWeight ? 0 : Float(w)
        }
    }

    /// Decay weights below this are 0 (see `powers`): products with inputs down to about 1.2e-8 stay normal fp32.
    static let smallestWeight = 1e-30

    /// Row weights of the state term for rows 0..<n: λ^(i+1) (forward; the state ends just before row 0) or
    /// λ^(n-i) (reverse; the state starts just after row n-1).
    static func termWeights(_ lambda: Float, rows n: Int, _ direction: Direction) -> [Float] {
        direction == .forward ? powers(lambda, (0..<n).map { $0 + 1 }) : powers(lambda, (0..<n).map { n - $0 })
    }

    /// Row weights with which rows 0..<n enter a block's state: λ^(n-1-j) (forward: the state is taken after the
    /// last row) or λ^j (reverse: before the first).
    static func absorbWeights(_ lambda: Float, rows n: Int, _ direction: Direction) -> [Float] {
        direction == .forward ? powers(lambda, (0..<n).map { n - 1 - $0 }) : powers(lambda, 0..<n)
    }

    /// One head's decay weights for blocks of `n` rows (both precisions' chunk loops): the full block's, computed once
    /// per head, and a shorter last block's (`m` rows) on demand; nil weights where the head does not decay.
    struct BlockWeights {
        let lambda: Float, n: Int, direction: Direction
        let decays: Bool
        let fullTerm: [Float]?, fullAbsorb: [Float]?, fullBeta: Float

        init(_ lambda: Float, rows n: Int, _ direction: Direction) {
            (self.lambda, self.n, self.direction, decays) = (lambda, n, direction, lambda < 1)
            fullTerm = decays ? termWeights(lambda, rows: n, direction) : nil
            fullAbsorb = decays ? absorbWeights(lambda, rows: n, direction) : nil
            fullBeta = decays ? powers(lambda, [n])[0] : 1
        }

        /// The weights of the state term on a block of `m` rows.
        func term(_ m: Int) -> [Float]? { decays ? (m == n ? fullTerm : termWeights(lambda, rows: m, direction)) : nil }
        /// The weights of a block of `m` rows absorbed into the state.
        func absorb(_ m: Int) -> [Float]? { decays ? (m == n ? fullAbsorb : absorbWeights(lambda, rows: m, direction)) : nil }
        /// The state's decay across a block of `m` rows (0 before the first block: the state starts empty).
        func beta(_ m: Int, step: Int) -> Float { step == 0 ? 0 : (m == n ? fullBeta : powers(lambda, [m])[0]) }

        /// The same three for a block that documents `cut` (both precisions): rows the passed state does not reach,
        /// or that do not enter the state passed on, weigh 0, and a cut block replaces the state (beta 0).
        func term(_ m: Int, cut: BlockDocuments?) -> [Float]? {
            cut.map { BlockDocuments.masked(term(m), rows: m, keep: $0.termRows) } ?? term(m)
        }
        func absorb(_ m: Int, cut: BlockDocuments?) -> [Float]? {
            cut.map { BlockDocuments.masked(absorb(m), rows: m, keep: $0.absorbRows) } ?? absorb(m)
        }
        func beta(_ m: Int, step: Int, cut: BlockDocuments?) -> Float { cut == nil ? beta(m, step: step) : 0 }
    }

    /// A chunk's blocks of `n` rows in the order `direction` passes them, each with where documents (`starts`) cut
    /// it (both precisions).
    static func blockSchedule(rows: Int, block n: Int, _ direction: Direction, starts: [Int]) -> [(r0: Int, cut: BlockDocuments?)] {
        let blocks = Array(stride(from: 0, to: rows, by: n))
        return (direction == .forward ? blocks : blocks.reversed()).map { ($0, BlockDocuments(starts: starts, block: $0, min($0 + n, rows), direction)) }
    }

    /// Where documents cut one block [r0, r1) of a chunk (local rows 0..<m of the block), for `direction`. A block
    /// with a cut drops the state passed in when it forms the one it passes on (replaced, not decayed).
    struct BlockDocuments {
        /// Rows the running state of the blocks already passed reaches: forward, those before the first start in
        /// [r0, r1); reverse, those after the last start in (r0, r1] (a start at r1 cuts the block off from the state).
        let termRows: Range<Int>
        /// Rows that enter the state passed on: forward, from the last start in [r0, r1); reverse, before the first
        /// start in (r0, r1].
        let absorbRows: Range<Int>
        /// With a start strictly inside the block: per row, forward the first column of its document, reverse one past
        /// its last (the block mask is zeroed beyond); nil when every row of the block is one document.
        let limits: [Int]?

        /// The block's view of `starts` (ascending chunk rows). nil where no start touches the block: the plain path.
        init?(starts: [Int], block r0: Int, _ r1: Int, _ direction: Direction) {
            let m = r1 - r0
            let forward = direction == .forward
            // Starts that cut the state: [r0, r1) forward, (r0, r1] reverse; inside the block: (r0, r1).
            let (lo, hi) = forward ? (r0, r1) : (r0 + 1, r1 + 1)
            let cutting = starts[Self.firstIndex(in: starts, atLeast: lo)..<Self.firstIndex(in: starts, atLeast: hi)].map { $0 - r0 }
            guard !cutting.isEmpty else { return nil }
            let inside = cutting.filter { $0 > 0 && $0 < m }
            termRows = forward ? 0..<cutting.first! : cutting.last!..<m
            absorbRows = forward ? cutting.last!..<m : 0..<cutting.first!
            if inside.isEmpty {
                limits = nil
            } else if forward {
                var next = 0, first = 0
                limits = (0..<m).map { i in
                    while next < inside.count && inside[next] <= i { first = inside[next]; next += 1 }
                    return first
                }
            } else {
                var next = 0
                limits = (0..<m).map { i in
                    while next < inside.count && inside[next] <= i { next += 1 }
                    return next < inside.count ? inside[next] : m
                }
            }
        }

        /// The index of the first of the ascending `values` that is >= `bound` (binary search: a chunk may hold many
        /// documents, and every block looks).
        static func firstIndex(in values: [Int], atLeast bound: Int) -> Int {
            var (lo, hi) = (0, values.count)
            while lo < hi { let mid = (lo + hi) / 2; if values[mid] < bound { lo = mid + 1 } else { hi = mid } }
            return lo
        }

        /// `weights` (nil: ones) of `m` rows with the rows outside `keep` zeroed; `weights` itself when `keep` is all.
        static func masked(_ weights: [Float]?, rows m: Int, keep: Range<Int>) -> [Float]? {
            if keep == 0..<m { return weights }
            var w = weights ?? [Float](repeating: 1, count: m)
            for i in 0..<m where !keep.contains(i) { w[i] = 0 }
            return w
        }

        /// Zeroes the cross-document entries of row `i` of a masked block (`row`, m entries).
        func cut<T: Numeric>(_ row: UnsafeMutablePointer<T>, _ i: Int, _ m: Int, _ direction: Direction) {
            guard let limits else { return }
            if direction == .forward { row.update(repeating: 0, count: limits[i]) } else { (row + limits[i]).update(repeating: 0, count: m - limits[i]) }
        }
    }

    /// The intra-block mask Λ (n x n, row-major) for `direction`.
    static func mask(_ lambda: Float, rows n: Int, _ direction: Direction) -> [Float] {
        let p = powers(lambda, 0..<n)
        var m = [Float](repeating: 0, count: n * n)
        for i in 0..<n {
            for j in 0..<n {
                let d = direction == .forward ? i - j : j - i
                if d >= 0 { m[i * n + j] = p[d] }
            }
        }
        return m
    }

    /// Head h's view of a (B, C, heads_x, D) operand: head h / (H / heads_x).
    @inline(__always)
    static func view(_ t: Tensor, batch b: Int, head h: Int, heads: Int) -> Matrix {
        t.head(batch: b, h / (heads / t.shape[2]))
    }

    /// Head h's D_b x D_c block of a (B, H, D_b, D_c) state tensor.
    @inline(__always)
    static func stateView(_ s: Tensor, batch b: Int, head h: Int) -> Matrix {
        let (heads, rows, cols) = (s.shape[1], s.shape[2], s.shape[3])
        return Matrix(base: s.pointer + (b * heads + h) * rows * cols, rows: rows, cols: cols)
    }

    /// `out += diag(w) (a S)` (or `a S^T`), through one gemm into `scratch` (rows x cols of out).
    static func addWeighted(_ a: Matrix, _ s: Matrix, transposed: Bool, weights w: [Float]?, into out: Matrix, scratch: UnsafeMutablePointer<Float>) {
        guard let w else {
            BLAS.gemm(a, s, transposeB: transposed, into: out, beta: 1)
            return
        }
        let tmp = Matrix(base: scratch, rows: out.rows, cols: out.cols)
        BLAS.gemm(a, s, transposeB: transposed, into: tmp)
        addRows(tmp, weights: w, into: out)
    }

    /// `out[i] += w[i] * t[i]` for every row i (rows of weight 0 skipped): the decayed state term of both precisions.
    static func addRows(_ t: Matrix, weights w: [Float], into out: Matrix) {
        for i in 0..<out.rows where w[i] != 0 {
            let wi = w[i]
            VectorMath.update(out.base + i * out.ld, with: t.base + i * t.ld, out.cols) { o, x in o + x * wi }
        }
    }

    /// `S = (diag(w) b)^T c + beta S`; `w` nil means all ones. `scratch` holds rows x cols of b.
    static func absorb(_ b: Matrix, _ c: Matrix, weights w: [Float]?, beta: Float, into s: Matrix, scratch: UnsafeMutablePointer<Float>) {
        guard let w else {
            BLAS.gemm(b, transposeA: true, c, into: s, beta: beta)
            return
        }
        let bd = Matrix(base: scratch, rows: b.rows, cols: b.cols)
        for j in 0..<b.rows {
            let (src, dst) = (b.base + j * b.ld, bd.base + j * bd.cols)
            if w[j] == 0 { dst.update(repeating: 0, count: b.cols) } else {
                for d in 0..<b.cols { dst[d] = src[d] * w[j] }
            }
        }
        BLAS.gemm(bd, transposeA: true, c, into: s, beta: beta)
    }

    /// Decay factors per query head, validated.
    static func checkDecay(_ decay: [Float], heads: Int) {
        precondition(decay.count == heads && decay.allSatisfy { $0 > 0 && $0 <= 1 }, "decay \(decay) for \(heads) heads")
    }

    /// `out += ` the masked chunk product (see the file comment) over this chunk's rows, in blocks; `progress` runs
    /// after every block (LASP passes its collective's `test`). `out` is (B, C, heads_out, D_c). `starts`: the rows
    /// where a packed document starts (ascending; none: one document). bf16 needs `OneDNN.require()` to have succeeded.
    public static func chunk(_ a: Tensor, _ b: Tensor, _ c: Tensor, heads: Int, decay: [Float], direction: Direction,
                             starts: [Int] = [], precision: Precision = .fp32, into out: Tensor, progress: () -> Void = {}) {
        checkDecay(decay, heads: heads)
        let (batch, rows) = (a.shape[0], a.shape[1])
        let (db, dc) = (b.shape[3], c.shape[3])
        precondition(a.shape[3] == db && b.shape[1] == rows && c.shape[1] == rows && out.shape[1] == rows && out.shape[3] == dc)
        precondition(zip(starts, starts.dropFirst()).allSatisfy { $0 < $1 } && starts.allSatisfy { (0..<rows).contains($0) }, "document starts \(starts) in \(rows) rows")
        if rows == 0 { return }
        if precision == .bf16 { return chunkBF16(a, b, c, heads: heads, decay: decay, direction: direction, starts: starts, into: out, progress: progress) }
        let n = min(blockRows, rows)
        let scores = UnsafeMutablePointer<Float>.allocate(capacity: n * n)
        let scratch = UnsafeMutablePointer<Float>.allocate(capacity: n * max(db, dc))
        let fullMask = UnsafeMutablePointer<Float>.allocate(capacity: n * n)
        let state = Tensor(zeros: [1, 1, db, dc])
        // `stateView` is a raw view: keep the tensor alive to the end.
        defer { scores.deallocate(); scratch.deallocate(); fullMask.deallocate(); withExtendedLifetime(state) {} }
        let schedule = blockSchedule(rows: rows, block: n, direction, starts: starts)
        for h in 0..<heads {
            fullMask.update(from: mask(decay[h], rows: n, direction), count: n * n)
            let weights = BlockWeights(decay[h], rows: n, direction)
            for bi in 0..<batch {
                let (ah, bh, ch, oh) = (view(a, batch: bi, head: h, heads: heads), view(b, batch: bi, head: h, heads: heads),
                                        view(c, batch: bi, head: h, heads: heads), view(out, batch: bi, head: h, heads: heads))
                let s = stateView(state, batch: 0, head: 0)
                for (step, (r0, cut)) in schedule.enumerated() {
                    let r1 = min(r0 + n, rows), m = r1 - r0
                    let (ab, bb, cb, ob) = (ah.rows(r0..<r1), bh.rows(r0..<r1), ch.rows(r0..<r1), oh.rows(r0..<r1))
                    if step > 0, cut.map({ !$0.termRows.isEmpty }) ?? true {
                        addWeighted(ab, s, transposed: false, weights: weights.term(m, cut: cut), into: ob, scratch: scratch)
                    }
                    let sm = Matrix(base: scores, rows: m, cols: m)
                    BLAS.gemm(ab, bb, transposeB: true, into: sm)
                    for i in 0..<m {
                        VectorMath.update(scores + i * m, with: fullMask + i * n, m) { $0 * $1 }
                        cut?.cut(scores + i * m, i, m, direction)
                    }
                    BLAS.gemm(sm, cb, into: ob, beta: 1)
                    if step + 1 < schedule.count {
                        absorb(bb, cb, weights: weights.absorb(m, cut: cut), beta: weights.beta(m, step: step, cut: cut), into: s, scratch: scratch)
                    }
                    progress()
                }
            }
        }
    }

    /// A chunk's state per query head, (B, H, D_b, D_c): Σ_j w_j b_j^T c_j over `rows` (nil: all C) with
    /// w_j = λ^(end-1-j) (forward: the state just after the range's last row, what the chunk passes to later chunks
    /// when the range ends the chunk) or λ^(j-start) (reverse: the state just before its first row).
    public static func state(_ b: Tensor, _ c: Tensor, heads: Int, decay: [Float], direction: Direction,
                             rows range: Range<Int>? = nil, precision: Precision = .fp32) -> Tensor {
        checkDecay(decay, heads: heads)
        let range = range ?? 0..<b.shape[1]
        if precision == .bf16 { return stateBF16(b, c, heads: heads, decay: decay, direction: direction, rows: range) }
        let (batch, rows, db, dc) = (b.shape[0], range.count, b.shape[3], c.shape[3])
        let s = Tensor(zeros: [batch, heads, db, dc])
        let scratch = UnsafeMutablePointer<Float>.allocate(capacity: max(rows * db, 1))
        defer { scratch.deallocate() }
        for h in 0..<heads {
            let w = decay[h] < 1 ? absorbWeights(decay[h], rows: rows, direction) : nil
            for bi in 0..<batch {
                absorb(view(b, batch: bi, head: h, heads: heads).rows(range), view(c, batch: bi, head: h, heads: heads).rows(range), weights: w, beta: 0,
                       into: stateView(s, batch: bi, head: h), scratch: scratch)
            }
        }
        return s
    }

    /// `out_i += w_i a_i S_h` (or `S_h^T`) for every row i in `rows` (nil: all C), with w_i = λ^(i-start+1)
    /// (forward: S is the state just before the range's first row, the prefix state when it starts the chunk) or
    /// λ^(end-i) (reverse: S is the state just after its last row, the suffix state when it ends the chunk).
    public static func addStateTerm(_ a: Tensor, state: Tensor, transposed: Bool = false, heads: Int, decay: [Float],
                                    direction: Direction, rows range: Range<Int>? = nil, precision: Precision = .fp32, into out: Tensor) {
        checkDecay(decay, heads: heads)
        let range = range ?? 0..<a.shape[1]
        if range.isEmpty { return }
        if precision == .bf16 {
            return addStateTermBF16(a, state: state, transposed: transposed, heads: heads, decay: decay, direction: direction, rows: range, into: out)
        }
        let (batch, rows) = (a.shape[0], range.count)
        let scratch = UnsafeMutablePointer<Float>.allocate(capacity: max(rows * out.shape[3], 1))
        defer { scratch.deallocate() }
        for h in 0..<heads {
            let w = decay[h] < 1 ? termWeights(decay[h], rows: rows, direction) : nil
            for bi in 0..<batch {
                addWeighted(view(a, batch: bi, head: h, heads: heads).rows(range), stateView(state, batch: bi, head: h), transposed: transposed,
                            weights: w, into: view(out, batch: bi, head: h, heads: heads).rows(range), scratch: scratch)
            }
        }
    }

    /// `s ← λ_h^tokens s + m` for each (batch, head) block of two (B, H, D, D) states: carries a state across a
    /// chunk of `tokens` rows and adds that chunk's own state; with `restart` (a document starts in that chunk, so
    /// nothing before it reaches past it) `s ← m`. LASP-1 and LASP-2 both use exactly this arithmetic, in the same
    /// order, so they agree bit for bit.
    public static func carry(_ s: Tensor, adding m: Tensor, tokens: Int, decay: [Float], restart: Bool = false) {
        precondition(s.shape == m.shape)
        if restart { return s.pointer.update(from: m.pointer, count: m.count) }
        let (batch, heads) = (s.shape[0], s.shape[1])
        let block = s.shape[2] * s.shape[3]
        for h in 0..<heads {
            let f = decay[h] < 1 ? powers(decay[h], [tokens])[0] : 1
            for bi in 0..<batch {
                let (sp, mp) = (s.pointer + (bi * heads + h) * block, m.pointer + (bi * heads + h) * block)
                if f == 1 {
                    for i in 0..<block { sp[i] += mp[i] }
                } else {
                    for i in 0..<block { sp[i] = f * sp[i] + mp[i] }
                }
            }
        }
    }
}
