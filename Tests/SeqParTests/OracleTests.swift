// The oracle itself: a case worked by hand, and gradients against central finite differences.
import Foundation
import Testing
@testable import SeqPar

@Suite struct OracleTests {
    /// L = 2, one head, D = 1: q = [1, 2], k = [0, 1], v = [3, 5], scale 1.
    /// Row 0 scores [0, 1] -> o = (3 + 5e)/(1 + e); row 1 scores [0, 2] -> o = (3 + 5e^2)/(1 + e^2).
    @Test func handWorkedCase() {
        let q = Tensor(shape: [1, 2, 1, 1], values: [1, 2])
        let k = Tensor(shape: [1, 2, 1, 1], values: [0, 1])
        let v = Tensor(shape: [1, 2, 1, 1], values: [3, 5])
        let e = M_E
        let full = DenseOracle.forward(q: q, k: k, v: v, causal: false, scale: 1)
        #expect(abs(full.o[0] - (3 + 5 * e) / (1 + e)) < 1e-14)
        #expect(abs(full.o[1] - (3 + 5 * e * e) / (1 + e * e)) < 1e-14)
        #expect(abs(full.lse[0] - log(1 + e)) < 1e-14)
        #expect(abs(full.lse[1] - log(1 + e * e)) < 1e-14)
        let causal = DenseOracle.forward(q: q, k: k, v: v, causal: true, scale: 1)
        #expect(abs(causal.o[0] - 3) < 1e-14, "row 0 sees only key 0")
        #expect(abs(causal.lse[0] - 0) < 1e-14)
        #expect(abs(causal.o[1] - full.o[1]) < 1e-14)
        // A custom scale multiplies the scores: scale 2 on row 0 gives scores [0, 2].
        let scaled = DenseOracle.forward(q: q, k: k, v: v, causal: false, scale: 2)
        #expect(abs(scaled.o[0] - (3 + 5 * e * e) / (1 + e * e)) < 1e-14)
    }

    /// The error every check reports: relative to the oracle's largest magnitude, and absolute where the oracle is
    /// zero everywhere (one token: softmax over a single key has no gradient, so dQ and dK are exactly 0 and the
    /// kernel's rounding residue is all there is).
    @Test func relativeErrorAgainstAZeroOracleIsAbsolute() {
        #expect(relativeError(Tensor(shape: [3], values: [1, 2.5, -4]), [1, 2, -4]) == 0.5 / 4)
        #expect(relativeError(Tensor(shape: [2], values: [3e-8, -1e-8]), [0, 0]) == Double(Float(3e-8)))
        #expect(relativeError(Tensor(shape: [2], values: [0, 0]), [0, 0]) == 0)
        #expect(relativeError(Tensor(shape: [1], values: [.nan]), [0]).isNaN)
    }

    /// GQA: with kv heads shared, query heads 0 and 1 read kv head 0, heads 2 and 3 read kv head 1; equal to
    /// running plain multi-head attention on K/V with each kv head repeated.
    @Test func groupedQueryAttentionMatchesRepeatedHeads() {
        let s = AttentionShape(seqLen: 6, heads: 4, kvHeads: 2, headDim: 3)
        let x = SeededInputs.attention(shape: s, options: AttentionOptions(), positions: Array(0..<6), seed: 3)
        func repeated(_ t: Tensor) -> Tensor {
            let out = Tensor(zeros: [1, 6, 4, 3])
            for l in 0..<6 { for h in 0..<4 { for d in 0..<3 { out[0, l, h, d] = t[0, l, h / 2, d] } } }
            return out
        }
        let a = DenseOracle.forward(q: x.q, k: x.k, v: x.v, causal: true, scale: 0.5)
        let b = DenseOracle.forward(q: x.q, k: repeated(x.k), v: repeated(x.v), causal: true, scale: 0.5)
        #expect(zip(a.o, b.o).allSatisfy { abs($0 - $1) < 1e-14 })
    }

    /// Every gradient entry against a central difference of loss = sum(O * dO), in Double (h = 1e-5).
    @Test(arguments: [false, true]) func gradientsMatchFiniteDifferences(causal: Bool) {
        let dims = (b: 2, l: 5, h: 2, g: 1, d: 3)
        let rng = CounterRandom(seed: 11, stream: 9)
        func random(_ n: Int, _ offset: Int) -> [Double] { (0..<n).map { Double(rng.normal(offset + $0)) } }
        let q = random(dims.b * dims.l * dims.h * dims.d, 0)
        let k = random(dims.b * dims.l * dims.g * dims.d, 1000)
        let v = random(dims.b * dims.l * dims.g * dims.d, 2000)
        let dO = random(q.count, 3000)
        let scale = 0.7
        func loss(_ q: [Double], _ k: [Double], _ v: [Double]) -> Double {
            zip(DenseOracle.forward(q: q, k: k, v: v, dims: dims, causal: causal, scale: scale).o, dO).reduce(0) { $0 + $1.0 * $1.1 }
        }
        let g = DenseOracle.backward(q: q, k: k, v: v, gradOut: dO, dims: dims, causal: causal, scale: scale)
        let h = 1e-5
        for which in 0..<3 {
            let base = [q, k, v][which], grad = [g.dq, g.dk, g.dv][which]
            for i in 0..<base.count {
                var plus = [q, k, v], minus = [q, k, v]
                plus[which][i] += h
                minus[which][i] -= h
                let numeric = (loss(plus[0], plus[1], plus[2]) - loss(minus[0], minus[1], minus[2])) / (2 * h)
                #expect(abs(numeric - grad[i]) <= 1e-7 * max(1, abs(numeric)), "d\(["q", "k", "v"][which])[\(i)]: analytic \(grad[i]), numeric \(numeric)")
            }
        }
    }
}
