// USP (Ulysses x ring) against the Double oracle on the in-process cluster: every grid of 2, 4, 6 and 8 ranks, both
// layouts, causal and not, GQA, with and without documents, forward and backward; U = 1 is ring attention and U = P
// is Ulysses bit for bit; the grid's traffic (all-to-alls in the groups, P/U - 1 ring hops); degrees that do not fit.
import Testing
@testable import SeqPar

@Suite struct USPTests {
    static func options(_ degree: Int, causal: Bool, layout: SequenceLayout, documents: Documents? = nil, precision: Precision = .fp32) -> AttentionOptions {
        var o = AttentionOptions(causal: causal, layout: layout)
        (o.ulyssesDegree, o.documents, o.precision) = (degree, documents, precision)
        return o
    }

    /// Runs USP through the shared check (the degree travels in the options).
    func check(ranks: Int, degree: Int, shape: AttentionShape, causal: Bool, layout: SequenceLayout, documents: Documents? = nil) throws {
        let s = shape
        let options = Self.options(degree, causal: causal, layout: layout, documents: documents)
        let all = Array(0..<s.seqLen)
        let g = SeededInputs.attention(shape: s, options: options, positions: all, seed: 9)
        let dO = SeededInputs.gradOut(shape: s, positions: all, seed: 9)
        let scale = Double(options.effectiveScale(headDim: s.headDim))
        let ref = DenseOracle.forward(q: g.q, k: g.k, v: g.v, causal: causal, documents: documents, scale: scale)
        let refG = DenseOracle.backward(q: g.q, k: g.k, v: g.v, gradOut: dO, causal: causal, documents: documents, scale: scale)
        let results = try runOnCluster(USPAttention(), ranks: ranks, shape: s, options: options, seed: 9)
        expectMatches(results, o: ref.o, dq: refG.dq, dk: refG.dk, dv: refG.dv, shape: s, tolerance: Tolerance(),
                      "usp \(degree)x\(ranks / degree) \(s) \(causal) \(layout) \(documents.map { "\($0.lengths)" } ?? "")")
    }

    @Test(arguments: [(2, 1), (2, 2), (4, 1), (4, 2), (4, 4), (6, 2), (6, 3), (8, 2), (8, 4)])
    func gridsMatchTheOracle(ranks: Int, degree: Int) throws {
        let shape = AttentionShape(seqLen: 53, heads: 2 * degree, kvHeads: degree, headDim: 16)
        for causal in [false, true] {
            for layout in SequenceLayout.allCases {
                try check(ranks: ranks, degree: degree, shape: shape, causal: causal, layout: layout)
                try check(ranks: ranks, degree: degree, shape: shape, causal: causal, layout: layout,
                          documents: try Documents(lengths: [53 / ranks, 1, 20, 53 - 53 / ranks - 21], seqLen: 53))
            }
        }
    }

    /// kv heads fewer than the degree (each rank's query heads share one kv head) and batch 2.
    @Test func sharedKVHeadsAndBatch() throws {
        try check(ranks: 4, degree: 4, shape: AttentionShape(batch: 2, seqLen: 41, heads: 8, kvHeads: 2, headDim: 16), causal: true, layout: .zigzag)
        try check(ranks: 8, degree: 4, shape: AttentionShape(seqLen: 64, heads: 4, kvHeads: 1, headDim: 8), causal: true, layout: .zigzag,
                  documents: try Documents(lengths: [30, 2, 32], seqLen: 64))
    }

    /// U = 1 gives ring attention's bits and U = P Ulysses', in both precisions, forward and backward (bf16 as a run
    /// stores its tensors: USP's all-to-alls carry q, k, v, o and dO as bf16, as Ulysses' do).
    @Test func edgeDegreesAreRingAndUlysses() throws {
        let s = AttentionShape(seqLen: 47, heads: 8, kvHeads: 4, headDim: 16)
        let docs = try Documents(lengths: [20, 1, 26], seqLen: 47)
        for precision in [Precision.fp32] + (OneDNN.isAvailable ? [.bf16] : []) {
            for (degree, other) in [(1, AlgorithmName.ring), (4, .ulysses)] {
                for documents in [nil, docs] {
                    var plain = Self.options(degree, causal: true, layout: .zigzag, documents: documents, precision: precision)
                    let usp = try runOnCluster(USPAttention(), ranks: 4, shape: s, options: plain, seed: 5, storeBF16: precision == .bf16)
                    plain.ulyssesDegree = nil
                    let reference = try runOnCluster(other.implementation, ranks: 4, shape: s, options: plain, seed: 5, storeBF16: precision == .bf16)
                    for (a, b) in zip(usp, reference) {
                        #expect(a.o.toArray() == b.o.toArray() && a.lse.toArray() == b.lse.toArray() && a.grads.dq.toArray() == b.grads.dq.toArray()
                                && a.grads.dk.toArray() == b.grads.dk.toArray() && a.grads.dv.toArray() == b.grads.dv.toArray(),
                                "U=\(degree) vs \(other), \(precision), documents \(documents != nil)")
                    }
                }
            }
        }
    }

    /// The grid's traffic: in the forward pass each rank takes part in two all-to-alls (its group's) and sends
    /// P/U - 1 ring messages, each the bytes of a ring-attention block (the group's tokens on this rank's heads).
    @Test func trafficFollowsTheGrid() throws {
        let s = AttentionShape(seqLen: 64, heads: 4, kvHeads: 4, headDim: 8)
        let results = try runOnCluster(USPAttention(), ranks: 4, shape: s, options: Self.options(2, causal: false, layout: .contiguous), seed: 1)
        let ring = try runOnCluster(RingAttention(), ranks: 4, shape: s, options: AttentionOptions(), seed: 1)
        for (r, plain) in zip(results, ring) {
            let f = r.counters.forward
            #expect(f[.allToAllV] == 2 && f[.send] == 1, "\(f.calls)")
            #expect(plain.counters.forward[.send] == 3)
            // One ring hop of USP carries 2 x 32 tokens x 2 heads x 8 floats: a ring block of 16 tokens x 4 heads.
            #expect(f.messagesSent == 1 && plain.counters.forward.messagesSent == 3)
        }
    }

    /// bf16: the bf16 rule, through a whole run with documents.
    @Test(.enabled(if: OneDNN.isAvailable, "oneDNN (libdnnl) is not installed")) func bf16Rule() throws {
        let reports = try InProcessCluster.run(ranks: 4) { comm -> AttentionRunReport in
            var config = AttentionRunConfig(algorithm: .usp, shape: AttentionShape(seqLen: 160, heads: 4, kvHeads: 2, headDim: 32),
                                            options: Self.options(2, causal: true, layout: .zigzag, precision: .bf16))
            config.documentLengths = [60, 1, 99]
            (config.backward, config.check) = (true, true)
            return try AttentionRun.execute(config, comm: comm, backend: "test")
        }
        let c = try #require(reports[0].check)
        #expect(c.passed && c.plainBF16ForwardError != nil, "\(c)")
    }

    /// Degrees that do not divide the ranks or the heads are refused on every rank, naming the degrees that work;
    /// the degree on another algorithm is refused too.
    @Test func badDegreesAreRefused() throws {
        let s = AttentionShape(seqLen: 32, heads: 6, kvHeads: 3, headDim: 8)
        for (ranks, degree, expected) in [(4, 3, "--ulysses-degree 3 must divide the 4 ranks"), (4, 4, "--ulysses-degree 4 gives each rank"),
                                          (6, 0, "must divide the 6 ranks")] {
            let errors = try InProcessCluster.run(ranks: ranks) { comm -> String in
                let config = AttentionRunConfig(algorithm: .usp, shape: s, options: Self.options(degree, causal: true, layout: .zigzag))
                do { _ = try AttentionRun.execute(config, comm: comm, backend: "test"); return "no error" } catch { return "\(error)" }
            }
            for e in errors { #expect(e.contains(expected) && e.contains("degrees that work"), "\(e)") }
        }
        #expect { try AlgorithmName.ring.validate(ranks: 2, shape: s, options: Self.options(2, causal: true, layout: .zigzag)) }
            throws: { "\($0)".contains("--ulysses-degree 2 sets the Ulysses groups of --algorithm usp") }
    }
}
