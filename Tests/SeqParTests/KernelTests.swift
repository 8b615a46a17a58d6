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
