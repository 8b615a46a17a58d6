// Single-rank pieces: the vectorised exp, GEMM views, and the fp32 softmax kernel against the oracle.
import Foundation
import Testing
@testable import SeqPar

@Suite struct KernelTests {
    /// Relative error of the SIMD exp over the whole range where e^x is a normal float, and exact zeros below it.
    @Test func vectorisedExpIsAccurate() {
        var worst = 0.0
        var x: Float = -87.0
        while x < 88.3 {
            let approx = Double(VectorMath.exp(x)), exact = Foundation.exp(Double(x))
            worst = max(worst, abs(approx - exact) / exact)
            x += 0.0137
        }
        #expect(worst < 5e-7, "max relative error \(worst)")
        #expect(VectorMath.exp(-Float.infinity) == 0)
        #expect(VectorMath.exp(-100) == 0)
        #expect(VectorMath.exp(0) == 1)
    }

    @Test func expInPlaceHandlesTailsAndReturnsTheSum() {
        for n in [0, 1, 15, 16, 17, 40] {
            var values = (0..<n).map { Float($0) * 0.1 - 2 }
            let expected = values.map { Foundation.exp(Double($0) * 2 - 1) }
            let sum = values.withUnsafeMutableBufferPointer { VectorMath.expInPlace($0.baseAddress!, n, scale: 2, subtract: 1) }
            for (a, e) in zip(values, expected) { #expect(abs(Double(a) - e) <= 1e-6 * e) }
            #expect(abs(Double(sum) - expected.reduce(0, +)) <= 1e-5 * max(1, expected.reduce(0, +)))
        }
    }

    /// gemm with transposes and strided views against a plain loop.
    @Test(arguments: [(false, false), (true, false), (false, true), (true, true)])
    func gemmWithTransposesAndStrides(_ ta: Bool, _ tb: Bool) {
        let (m, n, k) = (5, 7, 3)
        let aStore = Tensor(shape: [ta ? k : m, 10], values: (0..<((ta ? k : m) * 10)).map { Float($0 % 7) - 3 })
        let bStore = Tensor(shape: [tb ? n : k, 9], values: (0..<((tb ? n : k) * 9)).map { Float($0 % 5) - 2 })
        let a = Matrix(base: aStore.pointer + 1, rows: ta ? k : m, cols: ta ? m : k, ld: 10)
        let b = Matrix(base: bStore.pointer + 2, rows: tb ? n : k, cols: tb ? k : n, ld: 9)
        let c = Tensor(zeros: [m, n])
        c.fill(1)
        BLAS.gemm(a, transposeA: ta, b, transposeB: tb, into: c.matrix, alpha: 2, beta: 0.5)
        for i in 0..<m {
            for j in 0..<n {
                var acc: Float = 0
                for t in 0..<k {
                    let av = ta ? a.base[t * a.ld + i] : a.base[i * a.ld + t]
                    let bv = tb ? b.base[j * b.ld + t] : b.base[t * b.ld + j]
                    acc += av * bv
                }
                #expect(c[i, j] == 2 * acc + 0.5)
            }
        }
    }

    @Test func tensorViewsShareStorage() {
        let t = Tensor(shape: [4, 2], values: [0, 1, 2, 3, 4, 5, 6, 7])
        let v = t.rows(1..<3)
        #expect(v.shape == [2, 2] && v.toArray() == [2, 3, 4, 5])
        v[0, 1] = 42
        #expect(t[1, 1] == 42)
        let c = t.copy()
        c[0, 0] = -1
        #expect(t[0, 0] == 0)
        #expect(t.reshaped([2, 4])[0, 3] == 42)
    }

    /// Queries at arbitrary ascending positions against keys at other positions (the shape allgather produces).
    @Test(arguments: [false, true]) func kernelAgainstOracleWithOffsetPositions(causal: Bool) throws {
        let s = AttentionShape(batch: 2, seqLen: 300, heads: 4, kvHeads: 2, headDim: 64)
        let all = Array(0..<300)
        let g = SeededInputs.attention(shape: s, options: AttentionOptions(), positions: all, seed: 5)
        let qPositions = Array(40..<90) + Array(200..<300)
        let q = SequenceLayoutTestHelper.rows(g.q, qPositions)
        let out = SoftmaxAttention.forward(q: q, qPositions: qPositions, k: g.k, v: g.v, kPositions: all, causal: causal, scale: 0.125)
        let ref = DenseOracle.forward(q: g.q, k: g.k, v: g.v, causal: causal, scale: 0.125)
        let expected = rowsAt(ref.o, batch: 2, length: 300, row: 4 * 64, positions: qPositions)
        #expect(relativeError(UnsafeBufferPointer(out.o.buffer), expected[...]) < 2e-5)
    }
}

/// Several query and key tiles (L > tileCols), so the online softmax rescales across key tiles; forward and
/// backward, inputs at scale 1 and 30, against the oracle.
/// Inputs x30 give logits of about 10^3, whose fp32 rounding (~10^-4 absolute, from the sgemm itself) is what limits
/// rows with near-tied maxima over 1100 keys: a single-tile run measures the same 8.0e-5 forward error as the
/// blockwise one. So x30 is held to `Tolerance.largeLogits` (2e-4 forward, 5e-4 gradients; and must stay finite),
/// here and in the algorithm tests.
@Suite struct BlockwiseKernelTests {
    @Test(arguments: [false, true], [Float(1), 30])
    func multiTileForwardAndBackward(causal: Bool, inputScale: Float) throws {
        let s = AttentionShape(seqLen: SoftmaxAttention.tileCols * 2 + 77, heads: 2, kvHeads: 1, headDim: 16)
        #expect(s.seqLen > 2 * SoftmaxAttention.tileCols && s.seqLen > 2 * SoftmaxAttention.tileRows)
        let all = Array(0..<s.seqLen)
        let x = SeededInputs.attention(shape: s, options: AttentionOptions(), positions: all, seed: 2, scale: inputScale)
        let dO = SeededInputs.gradOut(shape: s, positions: all, seed: 2)
        let out = SoftmaxAttention.forward(q: x.q, qPositions: all, k: x.k, v: x.v, kPositions: all, causal: causal, scale: 0.25)
        let grads = SoftmaxAttention.backward(q: x.q, qPositions: all, k: x.k, v: x.v, kPositions: all, output: out, gradOut: dO, causal: causal, scale: 0.25)
        let ref = DenseOracle.forward(q: x.q, k: x.k, v: x.v, causal: causal, scale: 0.25)
        let refG = DenseOracle.backward(q: x.q, k: x.k, v: x.v, gradOut: dO, causal: causal, scale: 0.25)
        let tolerance = inputScale == 1 ? Tolerance() : .largeLogits
        let (fwdTol, gradTol) = (tolerance.forward, tolerance.gradient)
        #expect(out.o.firstNonFinite() == nil && grads.dq.firstNonFinite() == nil && grads.dk.firstNonFinite() == nil)
        #expect(relativeError(out.o, ref.o) < fwdTol, "o \(relativeError(out.o, ref.o))")
        var lseWorst = 0.0
        for i in 0..<ref.lse.count { lseWorst = max(lseWorst, abs(Double(out.lse.pointer[i]) - ref.lse[i]) / max(1, abs(ref.lse[i]))) }
        #expect(lseWorst < fwdTol, "lse \(lseWorst)")
        #expect(relativeError(grads.dq, refG.dq) < gradTol, "dq \(relativeError(grads.dq, refG.dq))")
        #expect(relativeError(grads.dk, refG.dk) < gradTol, "dk \(relativeError(grads.dk, refG.dk))")
        #expect(relativeError(grads.dv, refG.dv) < gradTol, "dv \(relativeError(grads.dv, refG.dv))")
    }

    /// Backward in shares of its work (ring attention's own block in two halves): the shares add up to the whole,
    /// checked against the Double oracle; every (batch, head, query tile) unit lands in exactly one half, both halves
    /// hold work, and an empty share does nothing.
    @Test(arguments: [false, true]) func backwardInSharesAddsUpToTheWhole(causal: Bool) throws {
        let s = AttentionShape(batch: 2, seqLen: 3 * SoftmaxAttention.tileRows + 77, heads: 2, kvHeads: 1, headDim: 16)
        let all = Array(0..<s.seqLen)
        let x = SeededInputs.attention(shape: s, options: AttentionOptions(), positions: all, seed: 6)
        let dO = SeededInputs.gradOut(shape: s, positions: all, seed: 6)
        let out = SoftmaxAttention.forward(q: x.q, qPositions: all, k: x.k, v: x.v, kPositions: all, causal: causal, scale: 0.25)
        func part(_ work: Range<Double>) -> AttentionGradients {
            SoftmaxAttention.backward(q: x.q, qPositions: all, k: x.k, v: x.v, kPositions: all, output: out, gradOut: dO,
                                      causal: causal, scale: 0.25, work: work)
        }
        let shares = [part(0..<0.3), part(0.3..<0.5), part(0.5..<1)]
        let sum = AttentionGradients(dq: Tensor(zeros: x.q.shape), dk: Tensor(zeros: x.k.shape), dv: Tensor(zeros: x.v.shape))
        for g in shares { BLAS.axpy(g.dq, into: sum.dq); BLAS.axpy(g.dk, into: sum.dk); BLAS.axpy(g.dv, into: sum.dv) }
        let refG = DenseOracle.backward(q: x.q, k: x.k, v: x.v, gradOut: dO, causal: causal, scale: 0.25)
        let tol = Tolerance().gradient
        #expect(relativeError(sum.dq, refG.dq) < tol, "dq \(relativeError(sum.dq, refG.dq))")
        #expect(relativeError(sum.dk, refG.dk) < tol, "dk \(relativeError(sum.dk, refG.dk))")
        #expect(relativeError(sum.dv, refG.dv) < tol, "dv \(relativeError(sum.dv, refG.dv))")
        // dq rows of a unit are written only by the call that computes it.
        let (first, second) = (part(0..<0.5), part(0.5..<1))
        let rowWidth = s.headDim, tiles = (s.seqLen + SoftmaxAttention.tileRows - 1) / SoftmaxAttention.tileRows
        var inFirst = 0, inSecond = 0
        for b in 0..<s.batch {
            for h in 0..<s.heads {
                for t in 0..<tiles {
                    let rows = (t * SoftmaxAttention.tileRows)..<min((t + 1) * SoftmaxAttention.tileRows, s.seqLen)
                    func touched(_ g: AttentionGradients) -> Bool {
                        rows.contains { i in (0..<rowWidth).contains { g.dq.pointer[((b * s.seqLen + i) * s.heads + h) * rowWidth + $0] != 0 } }
                    }
                    let (a, c) = (touched(first), touched(second))
                    #expect(a != c, "unit b\(b) h\(h) tile \(t): first \(a), second \(c)")
                    if a { inFirst += 1 } else if c { inSecond += 1 }
                }
            }
        }
        #expect(inFirst > 0 && inSecond > 0)
        let none = part(0.4..<0.4)
        #expect(none.dq.toArray().allSatisfy { $0 == 0 } && none.dk.toArray().allSatisfy { $0 == 0 })
    }

    /// Keys in two blocks, merged in log space, equal the kernel over all keys; a block no query sees (-inf) is a no-op.
    @Test func lseMergeOfKeyBlocksEqualsTheWhole() {
        let s = AttentionShape(seqLen: 200, heads: 2, headDim: 16)
        let all = Array(0..<200)
        let x = SeededInputs.attention(shape: s, options: AttentionOptions(), positions: all, seed: 4, scale: 3)
        let qPositions = Array(50..<120)
        let q = SequenceLayoutTestHelper.rows(x.q, qPositions)
        let whole = SoftmaxAttention.forward(q: q, qPositions: qPositions, k: x.k, v: x.v, kPositions: all, causal: true, scale: 0.25)
        let acc = AttentionOutput(o: Tensor(zeros: q.shape), lse: Tensor(zeros: whole.lse.shape))
        acc.lse.fill(-.infinity)
        // Later keys first, and a block above every query (all -inf), to exercise each branch.
        for block in [Array(100..<200), Array(0..<100), Array(150..<200)] {
            let part = SoftmaxAttention.forward(q: q, qPositions: qPositions, k: SequenceLayoutTestHelper.rows(x.k, block),
                                                v: SequenceLayoutTestHelper.rows(x.v, block), kPositions: block, causal: true, scale: 0.25)
            LSEMerge.merge(into: acc, part)
        }
        let expected = whole.o.toArray().map(Double.init)
        #expect(relativeError(acc.o, expected) < 1e-6)
        for i in 0..<whole.lse.count { #expect(abs(acc.lse.pointer[i] - whole.lse.pointer[i]) <= 1e-5 * max(1, abs(whole.lse.pointer[i]))) }
    }

    /// A short key block under many queries (ring attention's zigzag halves): query tiles whose rows all see the same
    /// few keys widen past tileRows while the scores fit one tile; diagonal tiles and the longer key block keep
    /// tileRows. The two key blocks merged equal the Double oracle over the whole causal sequence.
    @Test func shortKeyBlocksWidenQueryTiles() {
        let (n, short) = (900, 200)
        let all = Array(0..<n)
        let windows = KeyWindows(queries: all, keys: Array(0..<short), causal: true)
        var tiles: [Range<Int>] = [], i0 = 0
        while i0 < n { let (end, _, _) = SoftmaxAttention.queryTile(from: i0, windows: windows); tiles.append(i0..<end); i0 = end }
        #expect(tiles == [0..<128, 128..<384, 384..<640, 640..<900], "\(tiles)")
        #expect(tiles.allSatisfy { $0.count * windows.upper[$0.upperBound - 1] <= SoftmaxAttention.tileRows * SoftmaxAttention.tileCols })
        let longer = KeyWindows(queries: all, keys: all, causal: true)
        #expect(SoftmaxAttention.queryTile(from: 256, windows: longer).end == 384)

        let s = AttentionShape(batch: 2, seqLen: n, heads: 2, kvHeads: 1, headDim: 16)
        let x = SeededInputs.attention(shape: s, options: AttentionOptions(), positions: all, seed: 6)
        let acc = AttentionOutput(o: Tensor(zeros: x.q.shape), lse: Tensor(zeros: [2, 2, n]))
        acc.lse.fill(-.infinity)
        for block in [Array(0..<short), Array(short..<n)] {
            LSEMerge.merge(into: acc, SoftmaxAttention.forward(q: x.q, qPositions: all, k: SequenceLayoutTestHelper.rows(x.k, block),
                                                               v: SequenceLayoutTestHelper.rows(x.v, block), kPositions: block, causal: true, scale: 0.25))
        }
        let ref = DenseOracle.forward(q: x.q, k: x.k, v: x.v, causal: true, scale: 0.25)
        #expect(relativeError(acc.o, ref.o) < Tolerance().forward, "o \(relativeError(acc.o, ref.o))")
    }

    @Test func lseMergeEdgeCases() {
        var o: [Float] = [1, 2], lse: Float = -.infinity
        // Empty accumulator takes the block.
        LSEMerge.mergeRow(o: &o, lse: &lse, blockO: [3, 4], blockLSE: 0.5, dim: 2)
        #expect(o == [3, 4] && lse == 0.5)
        // A fully masked block (-inf) changes nothing.
        LSEMerge.mergeRow(o: &o, lse: &lse, blockO: [.nan, .nan], blockLSE: -.infinity, dim: 2)
        #expect(o == [3, 4] && lse == 0.5)
        // Equal weights: the mean, and lse + log 2; huge logits do not overflow.
        var big: [Float] = [0, 2], bigLSE: Float = 1e30
        LSEMerge.mergeRow(o: &big, lse: &bigLSE, blockO: [2, 0], blockLSE: 1e30, dim: 2)
        #expect(big == [1, 1] && bigLSE.isFinite)
        var a: [Float] = [0, 2], aLSE: Float = 0
        LSEMerge.mergeRow(o: &a, lse: &aLSE, blockO: [2, 0], blockLSE: 0, dim: 2)
        #expect(abs(a[0] - 1) < 1e-6 && abs(a[1] - 1) < 1e-6 && abs(aLSE - Float(M_LN2)) < 1e-6)
    }
}

enum SequenceLayoutTestHelper {
    /// Rows `positions` of a (B, L, ...) tensor, copied.
    static func rows(_ t: Tensor, _ positions: [Int]) -> Tensor {
        var shape = t.shape
        shape[1] = positions.count
        let out = Tensor(zeros: shape)
        let row = t.shape.dropFirst(2).reduce(1, *)
        for b in 0..<t.shape[0] {
            for (i, p) in positions.enumerated() {
                (out.pointer + (b * positions.count + i) * row).update(from: t.pointer + (b * t.shape[1] + p) * row, count: row)
            }
        }
        return out
    }
}
