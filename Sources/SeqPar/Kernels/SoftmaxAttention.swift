// The blockwise softmax-attention kernel of one rank (FlashAttention-style), fp32, every product through OpenBLAS.
//
// Shapes: q (B, Cq, H, D) at global positions qPositions (ascending); k, v (B, Ck, G, D) at kPositions (ascending);
// o (B, Cq, H, D); lse (B, H, Cq), the log-sum-exp of each row's scaled scores (-inf for a row that sees no key,
// whose o is 0). Query head h reads kv head h / (H / G): GQA without copying K/V.
// Causal: query at position p sees keys at positions <= p, a prefix of the keys (they ascend): `visible[i]` keys.
//
// Forward: tiles of `tileRows` queries against tiles of `tileCols` keys with an online softmax (running max m,
// running sum l, output rescaled by exp(m_old - m_new) as each key tile arrives), never the full Cq x Ck matrix.
// Key tiles past a query tile's last visible key are skipped; only tiles that straddle the diagonal are masked.
// Backward: the same tiles, probabilities recomputed from lse: P = exp(S - lse), dP = dO V^T,
// dS = P * (dP - rowsum(dO * O)), dQ += scale dS K, dK += scale dS^T Q, dV += P^T dO.
// Memory: one tileRows x tileCols score tile (two in backward) and per-row statistics.

public enum SoftmaxAttention {
    /// Query rows per tile.
    public static let tileRows = 128
    /// Keys per tile.
    public static let tileCols = 512
    /// Query rows of a tile whose queries all see the same number of keys, fewer than `tileCols`: up to this many, as
    /// long as the scores stay within tileRows x tileCols (short key blocks, e.g. ring attention's zigzag halves, keep
    /// their GEMMs large).
    static let maxTileRows = 512

    /// The query tile starting at row `i0`: its end and its reach (the most keys any of its rows sees). Visible counts
    /// ascend with the query positions, so a tile's reach is its last row's.
    static func queryTile(from i0: Int, visible: [Int]) -> (end: Int, reach: Int) {
        var i1 = min(i0 + tileRows, visible.count)
        while i1 < visible.count, i1 - i0 < maxTileRows {
            let wider = min(i0 + 2 * (i1 - i0), visible.count, i0 + maxTileRows)
            // Only rows that see no more keys than the tile already does (no extra masked work: causal tiles on
            // the diagonal keep their skipping), and only while the scores fit the tile.
            guard visible[wider - 1] == visible[i1 - 1], (wider - i0) * visible[i1 - 1] <= tileRows * tileCols else { break }
            i1 = wider
        }
        return (i1, visible[i1 - 1])
    }

    /// Number of keys each query sees.
    static func visibleCounts(_ qPositions: [Int], _ kPositions: [Int], causal: Bool) -> [Int] {
        guard causal else { return Array(repeating: kPositions.count, count: qPositions.count) }
        return qPositions.map { p in
            var lo = 0, hi = kPositions.count  // first index with kPositions[idx] > p
            while lo < hi { let mid = (lo + hi) / 2; if kPositions[mid] <= p { lo = mid + 1 } else { hi = mid } }
            return lo
        }
    }

    /// `progress` runs after every query tile (ring attention passes its requests' `test` so the next exchange
    /// moves while this block computes).
    /// `precision` bf16 runs every product on oneDNN's bf16 matmul (SoftmaxAttentionBF16.swift; `OneDNN.require()`
    /// must have succeeded), fp32 on OpenBLAS.
    public static func forward(q: Tensor, qPositions: [Int], k: Tensor, v: Tensor, kPositions: [Int],
                               causal: Bool, scale: Float, precision: Precision = .fp32, progress: () -> Void = {}) -> AttentionOutput {
        let (batch, cq, heads) = (q.shape[0], q.shape[1], q.shape[2])
        let (ck, kvHeads) = (k.shape[1], k.shape[2])
        precondition(heads % kvHeads == 0 && qPositions.count == cq && kPositions.count == ck)
        let group = heads / kvHeads
        let o = Tensor(zeros: [batch, cq, heads, v.shape[3]])
        let lse = Tensor(zeros: [batch, heads, cq])
        let visible = visibleCounts(qPositions, kPositions, causal: causal)
        // Query tiles take their reach from their last row (`queryTile`): the rows must see ascending key counts, as
        // ascending query positions give. Checked once per call, not per head.
        precondition(zip(visible, visible.dropFirst()).allSatisfy { $0 <= $1 }, "query positions must ascend")
        if precision == .bf16 {
            let out = AttentionOutput(o: o, lse: lse)
            forwardBF16(q: .fp32(q), k: .fp32(k), v: .fp32(v), visible: visible, scale: scale, into: out, progress: progress)
            return out
        }
        let scratch = Scratch()
        for b in 0..<batch {
            for h in 0..<heads {
                forward(q: q.head(batch: b, h), k: k.head(batch: b, h / group), v: v.head(batch: b, h / group), visible: visible,
                        scale: scale, into: o.head(batch: b, h), lse: lse.pointer + (b * heads + h) * cq, scratch: scratch, progress: progress)
            }
        }
        return AttentionOutput(o: o, lse: lse)
    }

    /// A score tile and per-row statistics, allocated once per call and reused across heads.
    final class Scratch {
        let scores = UnsafeMutablePointer<Float>.allocate(capacity: tileRows * tileCols)
        let rowMax = UnsafeMutablePointer<Float>.allocate(capacity: maxTileRows), rowSum = UnsafeMutablePointer<Float>.allocate(capacity: maxTileRows)
        deinit { scores.deallocate(); rowMax.deallocate(); rowSum.deallocate() }
    }

    /// The online softmax's step for query row `i` of a tile (both precisions): a key tile whose exponentials, taken
    /// against `max`, sum to `sum`. When the row's running max grows, its output row (`dv` values, the products
    /// so far) and running sum are rescaled by exp(old max - max) first.
    @inline(__always)
    static func absorb(sum: Float, max newMax: Float, row i: Int, _ rowMax: UnsafeMutablePointer<Float>, _ rowSum: UnsafeMutablePointer<Float>,
                       output: UnsafeMutablePointer<Float>, _ dv: Int) {
        if rowMax[i] != -.infinity && rowMax[i] != newMax {
            let alpha = VectorMath.exp(rowMax[i] - newMax)
            VectorMath.scale(output, dv, by: alpha)
            rowSum[i] *= alpha
        }
        rowSum[i] += sum
        rowMax[i] = newMax
    }

    /// The end of a query tile (rows `rows` of the head, statistics from index 0): each output row divided by its
    /// running sum, and lse = max + log(sum); -inf for a row that saw no key (its output stays 0).
    @inline(__always)
    static func finish(rows: Range<Int>, _ rowMax: UnsafeMutablePointer<Float>, _ rowSum: UnsafeMutablePointer<Float>,
                       output oh: Matrix, lse lseRow: UnsafeMutablePointer<Float>) {
        for (i, r) in rows.enumerated() {
            if rowSum[i] == 0 { lseRow[r] = -.infinity; continue }
            VectorMath.scale(oh.base + r * oh.ld, oh.cols, by: 1 / rowSum[i])
            lseRow[r] = rowMax[i] + Float(log(Double(rowSum[i])))
        }
    }

    /// One head: rows of `q` (Cq x Dk) against rows of `k` (Ck x Dk) and `v` (Ck x Dv, any leading dimension: a
    /// column slice of a wider cache works), query row i seeing the first `visible[i]` keys; writes `o` (Cq x Dv,
    /// zeroed by the caller) and `lse[0..<Cq]`. The tiles and online softmax of the file comment.
    static func forward(q qh: Matrix, k kg: Matrix, v vg: Matrix, visible: [Int], scale: Float, into oh: Matrix,
                        lse lseRow: UnsafeMutablePointer<Float>, scratch: Scratch, progress: () -> Void = {}) {
        let (cq, dv) = (qh.rows, vg.cols)
        precondition(qh.cols == kg.cols && kg.rows == vg.rows && oh.rows == cq && oh.cols == dv && visible.count == cq)
        let scores = scratch.scores
        var i0 = 0
        while i0 < cq {
            let (i1, reach) = queryTile(from: i0, visible: visible)
            let rows = i1 - i0
            defer { i0 = i1 }
            for i in 0..<rows { scratch.rowMax[i] = -.infinity; scratch.rowSum[i] = 0 }
            for j0 in stride(from: 0, to: reach, by: tileCols) {
                let j1 = min(j0 + tileCols, reach), width = j1 - j0
                let s = Matrix(base: scores, rows: rows, cols: width)
                BLAS.gemm(qh.rows(i0..<i1), kg.rows(j0..<j1), transposeB: true, into: s, alpha: scale)
                for i in 0..<rows {
                    let row = scores + i * width
                    let valid = min(max(visible[i0 + i] - j0, 0), width)
                    if valid == 0 { row.update(repeating: 0, count: width); continue }
                    let newMax = max(scratch.rowMax[i], VectorMath.max(row, valid))
                    let sum = VectorMath.expInPlace(row, valid, subtract: newMax)
                    if valid < width { (row + valid).update(repeating: 0, count: width - valid) }
                    absorb(sum: sum, max: newMax, row: i, scratch.rowMax, scratch.rowSum, output: oh.base + (i0 + i) * oh.ld, dv)
                }
                BLAS.gemm(s, vg.rows(j0..<j1), into: oh.rows(i0..<i1), beta: 1)
            }
            finish(rows: i0..<i1, scratch.rowMax, scratch.rowSum, output: oh, lse: lseRow)
            progress()
        }
    }

    /// Gradients of `sum(o * dO)`: dq (B, Cq, H, D), dk and dv (B, Ck, G, D), recomputing probabilities from lse.
    /// `output` is the forward result over the same keys, or over a superset of them (ring attention passes the
    /// final output and lse and calls this once per key block: the gradients then add up across blocks).
    /// `work` selects a share of the call's work: its units are (batch, head, query tile), in that order, each costing
    /// rows x visible keys; a unit belongs to the share holding the middle of its cost. Calls whose shares partition
    /// 0..<1 add up to the whole (ring attention computes its own block in two such halves; see `RingAttention`).
    public static func backward(q: Tensor, qPositions: [Int], k: Tensor, v: Tensor, kPositions: [Int],
                                output: AttentionOutput, gradOut dO: Tensor, causal: Bool, scale: Float, precision: Precision = .fp32,
                                work: Range<Double> = 0..<1, progress: () -> Void = {}) -> AttentionGradients {
        let grads = AttentionGradients(dq: Tensor(zeros: q.shape), dk: Tensor(zeros: k.shape), dv: Tensor(zeros: v.shape))
        backward(q: q, qPositions: qPositions, k: k, v: v, kPositions: kPositions, output: output, gradOut: dO, causal: causal,
                 scale: scale, precision: precision, adding: grads, work: work, progress: progress)
        return grads
    }

    /// The same, adding into `grads` (dq shaped like q; dk, dv like k and v): no allocation the size of a block, so a
    /// caller that accumulates over blocks (ring attention) passes its own sums.
    public static func backward(q: Tensor, qPositions: [Int], k: Tensor, v: Tensor, kPositions: [Int],
                                output: AttentionOutput, gradOut dO: Tensor, causal: Bool, scale: Float, precision: Precision = .fp32,
                                adding grads: AttentionGradients, work: Range<Double> = 0..<1, progress: () -> Void = {}) {
        let (batch, cq, heads, dim) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3])
        let kvHeads = k.shape[2]
        precondition(dO.shape == q.shape && output.o.shape == q.shape && kPositions.count == k.shape[1])
        precondition(grads.dq.shape == q.shape && grads.dk.shape == k.shape && grads.dv.shape == v.shape)
        let group = heads / kvHeads
        let (dq, dk, dv) = (grads.dq, grads.dk, grads.dv)
        let visible = visibleCounts(qPositions, kPositions, causal: causal)
        if precision == .bf16 {
            return backwardBF16(q: .fp32(q), k: .fp32(k), v: .fp32(v), visible: visible, output: output, gradOut: dO, scale: scale, adding: grads,
                                work: work, progress: progress)
        }
        let p = UnsafeMutablePointer<Float>.allocate(capacity: tileRows * tileCols)
        let dp = UnsafeMutablePointer<Float>.allocate(capacity: tileRows * tileCols)
        var rowDot = [Float](repeating: 0, count: tileRows)
        defer { p.deallocate(); dp.deallocate() }
        for unit in backwardShare(batch: batch, heads: heads, visible: visible, work: work) {
            let (b, h, g) = (unit.batch, unit.head, unit.head / group)
            let (qh, kg, vg) = (q.head(batch: b, h), k.head(batch: b, g), v.head(batch: b, g))
            let (oh, doh, dqh, dkg, dvg) = (output.o.head(batch: b, h), dO.head(batch: b, h), dq.head(batch: b, h), dk.head(batch: b, g), dv.head(batch: b, g))
            let lseRow = output.lse.pointer + (b * heads + h) * cq
            for (i0, rows, reach) in unit.tiles {
                let i1 = i0 + rows
                for i in i0..<i1 { rowDot[i - i0] = VectorMath.dot(doh.base + i * doh.ld, oh.base + i * oh.ld, dim) }
                for j0 in stride(from: 0, to: reach, by: tileCols) {
                    let j1 = min(j0 + tileCols, reach), width = j1 - j0
                    let pm = Matrix(base: p, rows: rows, cols: width), dpm = Matrix(base: dp, rows: rows, cols: width)
                    BLAS.gemm(qh.rows(i0..<i1), kg.rows(j0..<j1), transposeB: true, into: pm, alpha: scale)
                    BLAS.gemm(doh.rows(i0..<i1), vg.rows(j0..<j1), transposeB: true, into: dpm)
                    for i in 0..<rows {
                        let valid = min(max(visible[i0 + i] - j0, 0), width)
                        let pr = p + i * width, dpr = dp + i * width
                        if valid > 0 { VectorMath.expInPlace(pr, valid, subtract: lseRow[i0 + i]) }
                        if valid < width { (pr + valid).update(repeating: 0, count: width - valid) }
                        VectorMath.softmaxGradient(probabilities: pr, gradient: dpr, width, rowDot: rowDot[i])
                    }
                    // dpm now holds dS = P * (dP - rowDot).
                    BLAS.gemm(dpm, kg.rows(j0..<j1), into: dqh.rows(i0..<i1), alpha: scale, beta: 1)
                    BLAS.gemm(dpm, transposeA: true, qh.rows(i0..<i1), into: dkg.rows(j0..<j1), alpha: scale, beta: 1)
                    BLAS.gemm(pm, transposeA: true, doh.rows(i0..<i1), into: dvg.rows(j0..<j1), beta: 1)
                }
                progress()
            }
        }
    }

    /// A query tile of the backward: its first row, its rows, and its reach (the most keys any of its rows sees).
    typealias BackwardTile = (i0: Int, rows: Int, reach: Int)

    /// The backward's work in a share `work` of 0..<1 (both precisions): its units are (batch, head, query tile), in
    /// that order, each costing rows x reach; a unit belongs to the share holding the middle of its cost, so shares
    /// that partition 0..<1 split the work without overlap. Heads with no unit in the share are left out.
    static func backwardShare(batch: Int, heads: Int, visible: [Int], work: Range<Double>) -> [(batch: Int, head: Int, tiles: [BackwardTile])] {
        let cq = visible.count
        let tiles: [BackwardTile] = stride(from: 0, to: cq, by: tileRows).map { i0 in
            (i0, min(tileRows, cq - i0), visible[i0..<min(i0 + tileRows, cq)].max()!)
        }
        let total = tiles.reduce(0.0) { $0 + Double($1.rows * $1.reach) } * Double(batch * heads)
        var done = 0.0
        var share: [(batch: Int, head: Int, tiles: [BackwardTile])] = []
        for b in 0..<batch {
            for h in 0..<heads {
                let mine = tiles.filter { t in
                    let cost = Double(t.rows * t.reach)
                    defer { done += cost }
                    return t.reach > 0 && work.contains((done + cost / 2) / total)
                }
                if !mine.isEmpty { share.append((b, h, mine)) }
            }
        }
        return share
    }
}

extension VectorMath {
    /// `g[j] = p[j] * (g[j] - rowDot)` for j < n: the softmax backward step, dS = P * (dP - rowsum(dO * O)).
    @inline(__always)
    public static func softmaxGradient(probabilities p: UnsafePointer<Float>, gradient g: UnsafeMutablePointer<Float>, _ n: Int, rowDot: Float) {
        var i = 0
        let d = V(repeating: rowDot)
        while i + 16 <= n {
            let raw = UnsafeMutableRawPointer(g + i)
            raw.storeBytes(of: UnsafeRawPointer(p + i).loadUnaligned(as: V.self) * (raw.loadUnaligned(as: V.self) - d), as: V.self)
            i += 16
        }
        while i < n { g[i] = p[i] * (g[i] - rowDot); i += 1 }
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
