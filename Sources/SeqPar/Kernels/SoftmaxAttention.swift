// The blockwise softmax-attention kernel of one rank (FlashAttention-style), fp32, every product through OpenBLAS.
//
// Shapes: q (B, Cq, H, D) at global positions qPositions (ascending); k, v (B, Ck, G, D) at kPositions (ascending);
// o (B, Cq, H, D); lse (B, H, Cq), the log-sum-exp of each row's scaled scores (-inf for a row that sees no key,
// whose o is 0). Query head h reads kv head h / (H / G): GQA without copying K/V.
// Causal: query at position p sees keys at positions <= p. Documents (`Documents`): keys of p's document only. Either
// way, for ascending key positions, row i sees one run of keys, `KeyWindows`' lower[i] ..< upper[i].
//
// Forward: tiles of `tileRows` queries against tiles of `tileCols` keys with an online softmax (running max m,
// running sum l, output rescaled by exp(m_old - m_new) as each key tile arrives), never the full Cq x Ck matrix.
// Key tiles outside a query tile's span (before its first row's first key, past its last row's last) are skipped;
// only tiles that straddle the diagonal or a document boundary are masked.
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

    /// The end of a query tile of at most `rows` rows from `i0` that stays in one document: it stops where a row's
    /// first key moves (a document boundary among the queries), so that its key tiles span one document's keys and
    /// none across a boundary are multiplied.
    static func tileEnd(from i0: Int, rows: Int, windows: KeyWindows) -> Int {
        let limit = min(i0 + rows, windows.count)
        let first = windows.lower[i0]
        guard windows.lower[limit - 1] != first else { return limit }
        var (lo, hi) = (i0 + 1, limit - 1)  // the first row whose first key differs: lower ascends
        while lo < hi { let mid = (lo + hi) / 2; if windows.lower[mid] == first { lo = mid + 1 } else { hi = mid } }
        return lo
    }

    /// The query tile starting at row `i0`: its end, and the keys its rows see between them, `start ..< reach` (the
    /// first row's first key to the last row's last: both bounds ascend with the rows). A tile holds one document's
    /// queries (`tileEnd`).
    static func queryTile(from i0: Int, windows: KeyWindows) -> (end: Int, start: Int, reach: Int) {
        let (lower, upper) = (windows.lower, windows.upper)
        var i1 = tileEnd(from: i0, rows: tileRows, windows: windows)
        while i1 < windows.count, i1 - i0 < maxTileRows {
            let wider = min(i0 + 2 * (i1 - i0), windows.count, i0 + maxTileRows)
            // Only rows that see the keys the tile already spans (no extra masked work: causal tiles on the diagonal
            // and tiles across a document boundary keep their skipping), and only while the scores fit the tile.
            guard upper[wider - 1] == upper[i1 - 1], lower[wider - 1] == lower[i0],
                  (wider - i0) * (upper[i1 - 1] - lower[i0]) <= tileRows * tileCols else { break }
            i1 = wider
        }
        return (i1, lower[i0], upper[i1 - 1])
    }

    /// Where row `r`'s keys lie in the key tile `j0 ..< j0 + width`: columns `a ..< b` (a == b when none).
    @inline(__always)
    static func segment(_ windows: KeyWindows, row r: Int, tile j0: Int, width: Int) -> (a: Int, b: Int) {
        let a = min(max(windows.lower[r] - j0, 0), width)
        return (a, max(min(windows.upper[r] - j0, width), a))
    }

    /// The windows of a call, checked once (not per head): query tiles take their span from their first and last
    /// rows, so both bounds must ascend, as ascending query positions give.
    static func windows(_ qPositions: [Int], _ kPositions: [Int], causal: Bool, documents: Documents?) -> KeyWindows {
        let w = KeyWindows(queries: qPositions, keys: kPositions, causal: causal, documents: documents)
        precondition(zip(w.upper, w.upper.dropFirst()).allSatisfy { $0 <= $1 } && zip(w.lower, w.lower.dropFirst()).allSatisfy { $0 <= $1 },
                     "query positions must ascend")
        return w
    }

    /// `progress` runs after every query tile (ring attention passes its requests' `test` so the next exchange
    /// moves while this block computes).
    /// `precision` bf16 runs every product on oneDNN's bf16 matmul (SoftmaxAttentionBF16.swift; `OneDNN.require()`
    /// must have succeeded), fp32 on OpenBLAS.
    public static func forward(q: Tensor, qPositions: [Int], k: Tensor, v: Tensor, kPositions: [Int],
                               causal: Bool, documents: Documents? = nil, scale: Float, precision: Precision = .fp32,
                               progress: () -> Void = {}) -> AttentionOutput {
        let (batch, cq, heads) = (q.shape[0], q.shape[1], q.shape[2])
        let (ck, kvHeads) = (k.shape[1], k.shape[2])
        precondition(heads % kvHeads == 0 && qPositions.count == cq && kPositions.count == ck)
        let group = heads / kvHeads
        let o = Tensor(zeros: [batch, cq, heads, v.shape[3]])
        let lse = Tensor(zeros: [batch, heads, cq])
        let windows = windows(qPositions, kPositions, causal: causal, documents: documents)
        if precision == .bf16 {
            let out = AttentionOutput(o: o, lse: lse)
            forwardBF16(q: .fp32(q), k: .fp32(k), v: .fp32(v), windows: windows, scale: scale, into: out, progress: progress)
            return out
        }
        let scratch = Scratch()
        for b in 0..<batch {
            for h in 0..<heads {
                forward(q: q.head(batch: b, h), k: k.head(batch: b, h / group), v: v.head(batch: b, h / group), windows: windows,
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

    /// The end of a query tile (rows `rows` of the head, statistics from index 0): output row r = accumulator row
    /// r - rows.lowerBound over its running sum, and lse = max + log(sum); a row that saw no key gets 0 and -inf. The
    /// accumulator is the output's own rows (the fp32 kernel) or contiguous scratch (the bf16 kernel).
    @inline(__always)
    static func finish(rows: Range<Int>, _ rowMax: UnsafeMutablePointer<Float>, _ rowSum: UnsafeMutablePointer<Float>,
                       accumulator acc: Matrix, output oh: Matrix, lse lseRow: UnsafeMutablePointer<Float>) {
        for (i, r) in rows.enumerated() {
            let dst = oh.base + r * oh.ld
            if rowSum[i] == 0 { lseRow[r] = -.infinity; dst.update(repeating: 0, count: oh.cols); continue }
            let inverse = VectorMath.V(repeating: 1 / rowSum[i])
            VectorMath.update(dst, with: acc.base + i * acc.ld, oh.cols) { _, a in a * inverse }
            lseRow[r] = rowMax[i] + Float(log(Double(rowSum[i])))
        }
    }

    /// One head: rows of `q` (Cq x Dk) against rows of `k` (Ck x Dk) and `v` (Ck x Dv, any leading dimension: a
    /// column slice of a wider cache works), query row i seeing keys `windows.lower[i] ..< upper[i]`; writes `o` (Cq x Dv,
    /// zeroed by the caller) and `lse[0..<Cq]`. The tiles and online softmax of the file comment.
    static func forward(q qh: Matrix, k kg: Matrix, v vg: Matrix, windows: KeyWindows, scale: Float, into oh: Matrix,
                        lse lseRow: UnsafeMutablePointer<Float>, scratch: Scratch, progress: () -> Void = {}) {
        let (cq, dv) = (qh.rows, vg.cols)
        precondition(qh.cols == kg.cols && kg.rows == vg.rows && oh.rows == cq && oh.cols == dv && windows.count == cq)
        let scores = scratch.scores
        var i0 = 0
        while i0 < cq {
            let (i1, start, reach) = queryTile(from: i0, windows: windows)
            let rows = i1 - i0
            defer { i0 = i1 }
            for i in 0..<rows { scratch.rowMax[i] = -.infinity; scratch.rowSum[i] = 0 }
            for j0 in stride(from: start, to: reach, by: tileCols) {
                let j1 = min(j0 + tileCols, reach), width = j1 - j0
                let s = Matrix(base: scores, rows: rows, cols: width)
                KernelProfile.countScores(rows * width)
                BLAS.gemm(qh.rows(i0..<i1), kg.rows(j0..<j1), transposeB: true, into: s, alpha: scale)
                let softmaxStarted = KernelProfile.softmaxStart()
                for i in 0..<rows {
                    let row = scores + i * width
                    let (a, b) = segment(windows, row: i0 + i, tile: j0, width: width)
                    if a == b { row.update(repeating: 0, count: width); continue }
                    let newMax = max(scratch.rowMax[i], VectorMath.max(row + a, b - a))
                    let sum = VectorMath.expInPlace(row + a, b - a, subtract: newMax)
                    row.update(repeating: 0, count: a)
                    (row + b).update(repeating: 0, count: width - b)
                    absorb(sum: sum, max: newMax, row: i, scratch.rowMax, scratch.rowSum, output: oh.base + (i0 + i) * oh.ld, dv)
                }
                KernelProfile.softmaxEnd(softmaxStarted)
                BLAS.gemm(s, vg.rows(j0..<j1), into: oh.rows(i0..<i1), beta: 1)
            }
            finish(rows: i0..<i1, scratch.rowMax, scratch.rowSum, accumulator: oh.rows(i0..<i1), output: oh, lse: lseRow)
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
                                output: AttentionOutput, gradOut dO: Tensor, causal: Bool, documents: Documents? = nil, scale: Float,
                                precision: Precision = .fp32, work: Range<Double> = 0..<1, progress: () -> Void = {}) -> AttentionGradients {
        let grads = AttentionGradients(dq: Tensor(zeros: q.shape), dk: Tensor(zeros: k.shape), dv: Tensor(zeros: v.shape))
        backward(q: q, qPositions: qPositions, k: k, v: v, kPositions: kPositions, output: output, gradOut: dO, causal: causal,
                 documents: documents, scale: scale, precision: precision, adding: grads, work: work, progress: progress)
        return grads
    }

    /// The same, adding into `grads` (dq shaped like q; dk, dv like k and v): no allocation the size of a block, so a
    /// caller that accumulates over blocks (ring attention) passes its own sums.
    public static func backward(q: Tensor, qPositions: [Int], k: Tensor, v: Tensor, kPositions: [Int],
                                output: AttentionOutput, gradOut dO: Tensor, causal: Bool, documents: Documents? = nil, scale: Float,
                                precision: Precision = .fp32, adding grads: AttentionGradients, work: Range<Double> = 0..<1,
                                progress: () -> Void = {}) {
        let (batch, cq, heads, dim) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3])
        let kvHeads = k.shape[2]
        precondition(dO.shape == q.shape && output.o.shape == q.shape && kPositions.count == k.shape[1])
        precondition(grads.dq.shape == q.shape && grads.dk.shape == k.shape && grads.dv.shape == v.shape)
        let group = heads / kvHeads
        let (dq, dk, dv) = (grads.dq, grads.dk, grads.dv)
        let windows = windows(qPositions, kPositions, causal: causal, documents: documents)
        if precision == .bf16 {
            return backwardBF16(q: .fp32(q), k: .fp32(k), v: .fp32(v), windows: windows, output: output, gradOut: dO, scale: scale, adding: grads,
                                work: work, progress: progress)
        }
        let p = UnsafeMutablePointer<Float>.allocate(capacity: tileRows * tileCols)
        let dp = UnsafeMutablePointer<Float>.allocate(capacity: tileRows * tileCols)
        var rowDot = [Float](repeating: 0, count: tileRows)
        defer { p.deallocate(); dp.deallocate() }
        for unit in backwardShare(batch: batch, heads: heads, windows: windows, work: work) {
            let (b, h, g) = (unit.batch, unit.head, unit.head / group)
            let (qh, kg, vg) = (q.head(batch: b, h), k.head(batch: b, g), v.head(batch: b, g))
            let (oh, doh, dqh, dkg, dvg) = (output.o.head(batch: b, h), dO.head(batch: b, h), dq.head(batch: b, h), dk.head(batch: b, g), dv.head(batch: b, g))
            let lseRow = output.lse.pointer + (b * heads + h) * cq
            for (i0, rows, start, reach) in unit.tiles {
                let i1 = i0 + rows
                for i in i0..<i1 { rowDot[i - i0] = VectorMath.dot(doh.base + i * doh.ld, oh.base + i * oh.ld, dim) }
                for j0 in stride(from: start, to: reach, by: tileCols) {
                    let j1 = min(j0 + tileCols, reach), width = j1 - j0
                    let pm = Matrix(base: p, rows: rows, cols: width), dpm = Matrix(base: dp, rows: rows, cols: width)
                    BLAS.gemm(qh.rows(i0..<i1), kg.rows(j0..<j1), transposeB: true, into: pm, alpha: scale)
                    BLAS.gemm(doh.rows(i0..<i1), vg.rows(j0..<j1), transposeB: true, into: dpm)
                    let softmaxStarted = KernelProfile.softmaxStart()
                    for i in 0..<rows {
                        let (a, b) = segment(windows, row: i0 + i, tile: j0, width: width)
                        let pr = p + i * width, dpr = dp + i * width
                        if a < b { VectorMath.expInPlace(pr + a, b - a, subtract: lseRow[i0 + i]) }
                        pr.update(repeating: 0, count: a)
                        (pr + b).update(repeating: 0, count: width - b)
                        VectorMath.softmaxGradient(probabilities: pr, gradient: dpr, width, rowDot: rowDot[i])
                    }
                    KernelProfile.softmaxEnd(softmaxStarted)
                    // dpm now holds dS = P * (dP - rowDot).
                    BLAS.gemm(dpm, kg.rows(j0..<j1), into: dqh.rows(i0..<i1), alpha: scale, beta: 1)
                    BLAS.gemm(dpm, transposeA: true, qh.rows(i0..<i1), into: dkg.rows(j0..<j1), alpha: scale, beta: 1)
                    BLAS.gemm(pm, transposeA: true, doh.rows(i0..<i1), into: dvg.rows(j0..<j1), beta: 1)
                }
                progress()
            }
        }
    }

    /// A query tile of the backward: its first row, its rows, and the keys its rows see, `start ..< reach`.
    typealias BackwardTile = (i0: Int, rows: Int, start: Int, reach: Int)

    /// The backward's work in a share `work` of 0..<1 (both precisions): its units are (batch, head, query tile), in
    /// that order, each costing rows x the keys it spans; a unit belongs to the share holding the middle of its cost, so shares
    /// that partition 0..<1 split the work without overlap. Heads with no unit in the share are left out.
    static func backwardShare(batch: Int, heads: Int, windows: KeyWindows, work: Range<Double>) -> [(batch: Int, head: Int, tiles: [BackwardTile])] {
        let cq = windows.count
        var tiles: [BackwardTile] = []
        var i0 = 0
        while i0 < cq {
            let i1 = tileEnd(from: i0, rows: tileRows, windows: windows)
            tiles.append((i0, i1 - i0, windows.lower[i0], max(windows.upper[i1 - 1], windows.lower[i0])))
            i0 = i1
        }
        let total = tiles.reduce(0.0) { $0 + Double($1.rows * ($1.reach - $1.start)) } * Double(batch * heads)
        var done = 0.0
        var share: [(batch: Int, head: Int, tiles: [BackwardTile])] = []
        for b in 0..<batch {
            for h in 0..<heads {
                let mine = tiles.filter { t in
                    let cost = Double(t.rows * (t.reach - t.start))
                    defer { done += cost }
                    return cost > 0 && work.contains((done + cost / 2) / total)
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
