// bf16: conversions, and the blockwise kernel in bf16 against the Double oracle under FlashAttention's rule (error at
// most 2x that of a plain bf16 implementation, plus 1e-4; PlainBF16Attention), on bf16-rounded inputs.
import Testing
@testable import SeqPar
#if canImport(Glibc)
import Glibc
private func _exp2(_ x: Double) -> Double { Glibc.exp2(x) }
#endif

@Suite struct BF16ConversionTests {
    @Test func roundsToNearestEvenAndKeepsSpecialValues() {
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even significand (1).
        #expect(BF16.rounded(1 + 0x1p-8) == 1)
        // 1 + 3 * 2^-8 lies halfway between 1 + 2^-7 and 1 + 2^-6: even is 1 + 2^-6.
        #expect(BF16.rounded(1 + 3 * 0x1p-8) == 1 + 0x1p-6)
        #expect(BF16.rounded(1 + 0x1p-8 + 0x1p-20) == 1 + 0x1p-7)  // above the tie: up
        #expect(BF16.rounded(-2.5) == -2.5)
        #expect(BF16.rounded(.infinity) == .infinity && BF16.rounded(-.infinity) == -.infinity)
        #expect(BF16.rounded(.greatestFiniteMagnitude) == .infinity)  // rounds past the largest bf16
        #expect(BF16.rounded(.nan).isNaN)
        // A NaN whose payload sits only in the low 16 bits must not become infinity.
        #expect(BF16.rounded(Float(bitPattern: 0x7F80_0001)).isNaN)
        #expect(BF16.rounded(Float(bitPattern: 0xFF80_0001)).isNaN)
        #expect(BF16.rounded(0x1p-130) == 0x1p-130)  // subnormal with few bits: exact
    }

    /// The vectorised paths (16 lanes and the tail) agree with the scalar rounding, both directions.
    @Test func vectorAndScalarAgree() {
        let n = 16 * 5 + 7
        var rng = SystemRandomNumberGenerator()
        var values = (0..<n).map { _ in Float.random(in: -1000...1000, using: &rng) }
        values[3] = .nan; values[20] = .infinity; values[41] = -0.0; values[n - 1] = Float(bitPattern: 0x7F80_0001)
        let t = Tensor(shape: [n], values: values)
        var bits = [UInt16](repeating: 0, count: n)
        bits.withUnsafeMutableBufferPointer { t.convertToBF16($0.baseAddress!) }
        let back = [Float](unsafeUninitializedCapacity: n) { p, c in
            bits.withUnsafeBufferPointer { BF16.convert($0.baseAddress!, to: p.baseAddress!, n) }; c = n
        }
        t.roundToBF16()
        for i in 0..<n {
            let expected = BF16.rounded(values[i])
            #expect(bits[i] == BF16.bits(values[i]) || (expected.isNaN && back[i].isNaN), "element \(i)")
            #expect(back[i].bitPattern == t[i].bitPattern || (back[i].isNaN && t[i].isNaN), "element \(i)")
            #expect(back[i] == expected || (expected.isNaN && back[i].isNaN), "element \(i): \(back[i]) vs \(expected)")
        }
    }
}

@Suite struct BF16ExponentialTests {
    /// The bf16 kernels' base-2 exponential: within 6e-6 relative of exp2 in Double over the softmax's range, 0 below
    /// -126 and for -inf (masked scores), 1 at 0.
    @Test func exp2NonPositiveIsAccurate() {
        var worst = 0.0
        var x: Float = -125.9
        while x <= 0 {
            let got = Double(VectorMath.exp2NonPositive(.init(repeating: x))[0])
            worst = max(worst, abs(got - _exp2(Double(x))) / _exp2(Double(x)))
            x += 0.0137
        }
        #expect(worst < 6e-6, "worst relative error \(worst)")
        let edge = VectorMath.exp2NonPositive(.init(-.infinity, -127, -126.5, 0, 1e-7, -1, -0.5, 0.5, 0, 0, 0, 0, 0, 0, 0, 0))
        #expect(edge[0] == 0 && edge[1] == 0 && edge[2] == 0 && edge[3] == 1 && abs(edge[4] - 1) < 1e-6)
        #expect(abs(edge[5] - 0.5) < 3e-6 && abs(edge[6] - Float(0.5).squareRoot()) < 5e-6)
    }
}

/// Errors of a bf16 result and of the plain bf16 reference against the Double oracle on the same (rounded) inputs.
struct BF16Verdict: CustomStringConvertible {
    var name: String, error: Double, referenceError: Double
    var passes: Bool { error <= PlainBF16Attention.bound(referenceError: referenceError) }
    var description: String { "\(name): bf16 error \(error), plain bf16 reference \(referenceError)" }
}

@Suite(.enabled(if: OneDNN.isAvailable, "oneDNN (libdnnl) is not installed")) struct BF16KernelTests {
    /// Key tiles cover 0..<reach in order, and every reach from 1 to 4 tiles' worth uses at most 8 + 63 widths (each a
    /// oneDNN primitive: a growing decode cache must not create one per step).
    @Test func keyTilesHaveFewWidths() {
        var widths = Set<Int>()
        for reach in 1...(4 * SoftmaxAttention.tileCols) {
            let tiles = SoftmaxAttention.bf16KeyTiles(0, reach)
            #expect(tiles.first?.0 == 0 && tiles.last?.1 == reach && zip(tiles, tiles.dropFirst()).allSatisfy { $0.1 == $1.0 })
            widths.formUnion(tiles.map { $0.1 - $0.0 })
        }
        #expect(widths.count <= 8 + 63, "\(widths.count) widths")
        #expect(SoftmaxAttention.bf16KeyTiles(0, 589).map { $0.1 - $0.0 } == [512, 64, 13])
        #expect(SoftmaxAttention.bf16KeyTiles(100, 689).map { $0.1 - $0.0 } == [512, 64, 13])
    }

    /// Several query and key tiles, GQA, causal and not, a ragged last tile: o, lse and every gradient under the rule.
    @Test(arguments: [false, true]) func blockwiseKernelMeetsTheBF16Rule(causal: Bool) throws {
        try OneDNN.require()
        let s = AttentionShape(seqLen: SoftmaxAttention.tileCols + 77, heads: 2, kvHeads: 1, headDim: 16)
        let all = Array(0..<s.seqLen)
        let x = SeededInputs.attention(shape: s, options: AttentionOptions(), positions: all, seed: 3)
        let dO = SeededInputs.gradOut(shape: s, positions: all, seed: 3)
        for t in [x.q, x.k, x.v, dO] { t.roundToBF16() }
        let scale: Float = 0.2
        let out = SoftmaxAttention.forward(q: x.q, qPositions: all, k: x.k, v: x.v, kPositions: all, causal: causal, scale: scale, precision: .bf16)
        out.o.roundToBF16()
        let grads = SoftmaxAttention.backward(q: x.q, qPositions: all, k: x.k, v: x.v, kPositions: all, output: out, gradOut: dO,
                                              causal: causal, scale: scale, precision: .bf16)
        let ref = DenseOracle.forward(q: x.q, k: x.k, v: x.v, causal: causal, scale: Double(scale))
        let refG = DenseOracle.backward(q: x.q, k: x.k, v: x.v, gradOut: dO, causal: causal, scale: Double(scale))
        let plainO = PlainBF16Attention.forward(q: x.q, k: x.k, v: x.v, causal: causal, scale: scale)
        let plainG = PlainBF16Attention.backward(q: x.q, k: x.k, v: x.v, gradOut: dO, causal: causal, scale: scale)
        func error(_ a: [Double], _ e: [Double]) -> Double { relativeError(Tensor(shape: [a.count], values: a.map(Float.init)), e) }
        var lseWorst = 0.0
        for i in 0..<ref.lse.count { lseWorst = max(lseWorst, abs(Double(out.lse.pointer[i]) - ref.lse[i]) / max(1, abs(ref.lse[i]))) }
        #expect(lseWorst < 1e-2, "lse \(lseWorst)")
        for v in [BF16Verdict(name: "o", error: relativeError(out.o, ref.o), referenceError: error(plainO, ref.o)),
                  BF16Verdict(name: "dq", error: relativeError(grads.dq, refG.dq), referenceError: error(plainG.dq, refG.dq)),
                  BF16Verdict(name: "dk", error: relativeError(grads.dk, refG.dk), referenceError: error(plainG.dk, refG.dk)),
                  BF16Verdict(name: "dv", error: relativeError(grads.dv, refG.dv), referenceError: error(plainG.dv, refG.dv))] {
            #expect(v.passes, "\(v)")
            #expect(v.referenceError > 1e-4, "the plain reference must itself be a bf16 computation: \(v)")
        }
    }

    /// Ring attention's forward step: extending (o, lse) with a key block gives what merging the block's own result
    /// in log space gives (to P's rounding), and meets the bf16 rule over all the keys. The later block comes first, so under the
    /// causal mask some rows see no key in it (their lse stays -inf until the earlier block), and GQA shares kv heads.
    @Test(arguments: [false, true]) func extendingEqualsMergingBlocks(causal: Bool) throws {
        try OneDNN.require()
        let s = AttentionShape(seqLen: 300, heads: 4, kvHeads: 2, headDim: 32)
        let all = Array(0..<s.seqLen)
        let x = SeededInputs.attention(shape: s, options: AttentionOptions(), positions: all, seed: 5)
        for t in [x.q, x.k, x.v] { t.roundToBF16() }
        let scale: Float = 0.2
        func block(_ t: Tensor, _ r: Range<Int>) -> BF16Tensor {
            let token = s.kvHeads * s.headDim
            return BF16Tensor(rounding: Tensor(shape: [1, r.count, s.kvHeads, s.headDim], values: Array(t.toArray()[(r.lowerBound * token)..<(r.upperBound * token)])))
        }
        func empty() -> AttentionOutput {
            let out = AttentionOutput(o: Tensor(zeros: x.q.shape), lse: Tensor(zeros: [1, s.heads, s.seqLen]))
            out.lse.fill(-.infinity)
            return out
        }
        let q = BF16Tensor(rounding: x.q)
        let (extended, merged) = (empty(), empty())
        for r in [170..<s.seqLen, 0..<170] {
            let (k, v, keys) = (block(x.k, r), block(x.v, r), Array(r))
            SoftmaxAttention.forward(q: q, qPositions: all, k: k, v: v, kPositions: keys, causal: causal, scale: scale, extending: extended)
            LSEMerge.merge(into: merged, SoftmaxAttention.forward(q: q, qPositions: all, k: k, v: v, kPositions: keys, causal: causal, scale: scale))
        }
        // Not bit for bit: P is rounded to bf16 relative to a different running max (the earlier result's lse, not the
        // block's own maximum), so the two differ by P's rounding, 2^-8 at most; lse is not rounded.
        #expect(relativeError(extended.o, merged.o.toArray().map(Double.init)) < 4e-3)
        #expect(relativeError(extended.lse, merged.lse.toArray().map(Double.init)) < 1e-6)
        #expect(merged.lse.toArray().prefix(170).allSatisfy { $0.isFinite } && extended.lse.toArray().allSatisfy { $0.isFinite })
        let ref = DenseOracle.forward(q: x.q, k: x.k, v: x.v, causal: causal, scale: Double(scale))
        let plain = PlainBF16Attention.forward(q: x.q, k: x.k, v: x.v, causal: causal, scale: scale)
        let verdict = BF16Verdict(name: "o", error: relativeError(extended.o, ref.o),
                                  referenceError: relativeError(Tensor(shape: [plain.count], values: plain.map(Float.init)), ref.o))
        #expect(verdict.passes, "\(verdict)")
    }

    /// `--threads`: the forward's query tiles and the backward's kv heads shared among threads, some operands
    /// strided (fp32 q, GQA K/V in (B, C, G, D)), give the one-thread results bit for bit (each row and each kv head
    /// is computed the same way, whichever thread takes it), and those meet the bf16 rule against the Double oracle,
    /// with documents and the causal mask.
    @Test(arguments: [3, 8]) func threadsShareTheWork(threads: Int) throws {
        try OneDNN.require()
        let s = AttentionShape(seqLen: 520, heads: 4, kvHeads: 2, headDim: 32)
        let all = Array(0..<s.seqLen)
        let documents = try Documents(lengths: [250, 1, 269], seqLen: s.seqLen)
        let x = SeededInputs.attention(shape: s, options: AttentionOptions(), positions: all, seed: 8)
        for t in [x.q, x.k, x.v] { t.roundToBF16() }
        let scale: Float = 0.18
        let windows = SoftmaxAttention.windows(all, all, causal: true, documents: documents)
        func run(_ threads: Int) -> AttentionOutput {
            let out = AttentionOutput(o: Tensor(zeros: x.q.shape), lse: Tensor(zeros: [1, s.heads, s.seqLen]))
            SoftmaxAttention.forwardBF16(q: .fp32(x.q), k: .bf16(BF16Tensor(rounding: x.k)), v: .fp32(x.v), windows: windows, scale: scale,
                                         into: out, threads: threads, progress: {})
            return out
        }
        let (one, many) = (run(1), run(threads))
        #expect(one.o.toArray() == many.o.toArray())
        #expect(one.lse.toArray() == many.lse.toArray())
        let ref = DenseOracle.forward(q: x.q, k: x.k, v: x.v, causal: true, documents: documents, scale: Double(scale))
        let plain = PlainBF16Attention.forward(q: x.q, k: x.k, v: x.v, causal: true, documents: documents, scale: scale)
        let verdict = BF16Verdict(name: "o", error: relativeError(many.o, ref.o),
                                  referenceError: relativeError(Tensor(shape: [plain.count], values: plain.map(Float.init)), ref.o))
        #expect(verdict.passes, "\(verdict)")

        let dO = SeededInputs.gradOut(shape: s, positions: all, seed: 8)
        dO.roundToBF16()
        func gradients(_ threads: Int) -> AttentionGradients {
            let g = AttentionGradients(dq: Tensor(zeros: x.q.shape), dk: Tensor(zeros: x.k.shape), dv: Tensor(zeros: x.v.shape))
            SoftmaxAttention.backwardBF16(q: .fp32(x.q), k: .bf16(BF16Tensor(rounding: x.k)), v: .fp32(x.v), windows: windows, output: one,
                                          gradOut: dO, scale: scale, adding: g, work: 0..<1, threads: threads, progress: {})
            return g
        }
        let (alone, shared) = (gradients(1), gradients(threads))
        #expect(alone.dq.toArray() == shared.dq.toArray() && alone.dk.toArray() == shared.dk.toArray() && alone.dv.toArray() == shared.dv.toArray())
        let refGrads = DenseOracle.backward(q: x.q, k: x.k, v: x.v, gradOut: dO, causal: true, documents: documents, scale: Double(scale))
        let plainGrads = PlainBF16Attention.backward(q: x.q, k: x.k, v: x.v, gradOut: dO, causal: true, documents: documents, scale: scale)
        for (name, mine, ref, plain) in [("dq", shared.dq, refGrads.dq, plainGrads.dq), ("dk", shared.dk, refGrads.dk, plainGrads.dk),
                                         ("dv", shared.dv, refGrads.dv, plainGrads.dv)] {
            let v = BF16Verdict(name: name, error: relativeError(mine, ref),
                                referenceError: relativeError(Tensor(shape: [plain.count], values: plain.map(Float.init)), ref))
            #expect(v.passes, "\(v)")
        }
    }

    /// The kernels' document-major order: tiles grouped where their keys overlap, a new group where a tile's keys all
    /// lie past the earlier ones' (the next document); one group for a single causal or full sequence.
    @Test func segmentsSplitWhereKeysPart() {
        #expect(SoftmaxAttention.segments([(0, 10), (0, 20), (20, 30), (25, 40), (40, 40), (40, 50)]) == [0..<2, 2..<4, 4..<5, 5..<6])
        #expect(SoftmaxAttention.segments([(0, 128), (0, 256), (0, 384)]) == [0..<3])
        #expect(SoftmaxAttention.segments([(0, 512), (0, 512)]) == [0..<2])
        #expect(SoftmaxAttention.segments([]) == [])
        let windows = SoftmaxAttention.windows(Array(0..<700), Array(0..<700), causal: true, documents: try! Documents(lengths: [250, 1, 449], seqLen: 700))
        let tiles = SoftmaxAttention.queryTiles(windows)
        #expect(SoftmaxAttention.segments(tiles.map { ($0.start, $0.reach) }).map { tiles[$0.lowerBound].i0 } == [0, 250, 251])
    }
}

