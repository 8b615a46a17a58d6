// LASP-2H: a hybrid stack of linear (LASP-2) and softmax (allgather) layers with residuals, forward and backward,
// across 1, 2, 3, 4 and 8 ranks against the same stack computed in one process in Double with the oracles: each
// rank's rows of y and dx, and the weight gradients (all-reduced, the same on every rank). With packed documents too:
// every layer attends within a document (the oracle masks likewise), y within 2e-5, dx and weight gradients 1e-4.
import Testing
@testable import SeqPar

@Suite struct HybridStackTests {
    struct Run: @unchecked Sendable {
        var positions: [Int]
        var y: Tensor, dx: Tensor
        var dWeights: [HybridStack.Weights]
        var forward: CommCounters, backward: CommCounters
    }

    @discardableResult
    func check(_ pattern: String, ranks: Int, shape s: AttentionShape, decay: [Double], map: FeatureMap = .identity, seed: UInt64 = 3,
               documents: Documents? = nil) throws -> [Run] {
        let stack = HybridStack(layers: try HybridStack.layers(pattern), shape: s, decay: decay, featureMap: map, seed: seed, documents: documents)
        let all = Array(0..<s.seqLen)
        let x = SeededInputs.hidden(.hidden, seed: seed, batch: s.batch, length: s.seqLen, width: stack.width, positions: all)
        let dY = SeededInputs.hidden(.gradHidden, seed: seed, batch: s.batch, length: s.seqLen, width: stack.width, positions: all)
        let ref = HybridOracle.run(stack, x: x, gradOut: dY)
        let runs = try InProcessCluster.run(ranks: ranks) { comm -> Run in
            let positions = SequenceLayout.contiguous.positions(rank: comm.rank, ranks: comm.size, length: s.seqLen)
            let xr = SeededInputs.hidden(.hidden, seed: seed, batch: s.batch, length: s.seqLen, width: stack.width, positions: positions)
            let dYr = SeededInputs.hidden(.gradHidden, seed: seed, batch: s.batch, length: s.seqLen, width: stack.width, positions: positions)
            comm.resetCounters()
            let (y, cache) = try stack.forward(xr, positions: positions, comm: comm)
            let fwd = comm.counters
            comm.resetCounters()
            let (dx, dW) = try stack.backward(cache, gradOut: dYr, comm: comm)
            return Run(positions: positions, y: y, dx: dx, dWeights: dW, forward: fwd, backward: comm.counters)
        }
        let label = "\(pattern) P=\(ranks) \(s) decay \(decay) \(map)\(documents.map { " documents \($0.lengths)" } ?? "")"
        #expect(!ref.dx!.contains { !$0.isFinite }, "\(label): oracle dx not finite")
        #expect(!runs[0].dx.buffer.contains { !$0.isFinite }, "\(label): dx not finite")
        for r in runs {
            for (name, t, full, tol) in [("y", r.y, ref.y, 2e-5), ("dx", r.dx, ref.dx!, 1e-4)] {
                let mine = rowsAt(full, batch: s.batch, length: s.seqLen, row: stack.width, positions: r.positions)
                let scale = full.map(abs).max()!
                var worst = 0.0
                for (a, e) in zip(t.buffer, mine) { let d = abs(Double(a) - e); worst = d.isNaN ? .infinity : max(worst, d) }
                #expect(worst / scale <= tol, "\(label): a rank's rows of \(name): relative error \(worst / scale)")
            }
            for (l, w) in r.dWeights.enumerated() {
                for (i, name) in ["dWq", "dWk", "dWv", "dWo"].enumerated() {
                    let e = relativeError(w.all[i], ref.dWeights![l][i])
                    #expect(e <= 1e-4, "\(label): layer \(l) \(name) relative error \(e)")
                }
            }
        }
        return runs
    }

    @Test(arguments: [1, 2, 3, 4, 8])
    func matchesOracle(ranks: Int) throws {
        let s = AttentionShape(seqLen: 29, heads: 4, kvHeads: 2, headDim: 8)
        try check("LLLS", ranks: ranks, shape: s, decay: [0.9, 0.95, 0.99, 1])
        try check("SLSL", ranks: ranks, shape: s, decay: [0.8], map: .elu1)
    }

    /// Packed documents (one-token ones, one at a chunk edge at 4 ranks, one over several chunks): every layer stays
    /// inside its document, and the communication is that of the stack without documents.
    @Test(arguments: [1, 2, 3, 4, 8])
    func documentsMatchOracle(ranks: Int) throws {
        let s = AttentionShape(seqLen: 29, heads: 4, kvHeads: 2, headDim: 8)
        for lengths in [[1, 7, 1, 12, 8], [16, 13]] {
            let documents = try Documents(lengths: lengths, seqLen: s.seqLen)
            let runs = try check("LLLS", ranks: ranks, shape: s, decay: [0.9, 0.95, 0.99, 1], documents: documents)
            try check("SLSL", ranks: ranks, shape: s, decay: [0.8], map: .elu1, documents: documents)
            let plain = try check("LLLS", ranks: ranks, shape: s, decay: [0.9, 0.95, 0.99, 1])
            for (a, b) in zip(runs, plain) {
                #expect(a.forward.calls == b.forward.calls && a.forward.bytesSent == b.forward.bytesSent && a.backward.calls == b.backward.calls)
            }
        }
        // One document is none, bit for bit.
        let single = try check("LS", ranks: ranks, shape: s, decay: [0.9], documents: Documents(single: s.seqLen))
        let plain = try check("LS", ranks: ranks, shape: s, decay: [0.9])
        #expect(zip(single, plain).allSatisfy { $0.y.toArray() == $1.y.toArray() && $0.dx.toArray() == $1.dx.toArray() })
    }

    /// HybridRun with documents: --check passes; documents that do not cover the sequence are refused.
    @Test func hybridRunWithDocuments() throws {
        var config = HybridRunConfig(layers: "LSL", shape: AttentionShape(seqLen: 40, heads: 2, headDim: 8))
        (config.backward, config.check, config.decay, config.documents) = (true, true, [0.9], try Documents(lengths: [13, 1, 26], seqLen: 40))
        let c = config
        let report = try InProcessCluster.run(ranks: 3) { try HybridRun.execute(c, comm: $0, backend: "test") }[0]
        #expect(report.check?.passed == true, "\(report.check?.summary ?? "no check")")
        config.documents = try Documents(lengths: [13, 28], seqLen: 41)
        let bad = config
        #expect { _ = try InProcessCluster.run(ranks: 2) { try HybridRun.execute(bad, comm: $0, backend: "test") } } throws: { "\($0)".contains("cover 41 tokens") }
    }

    /// Batch 2, a softmax first layer, chunks longer than a linear block, the identity decay.
    @Test func longerChunksAndBatch() throws {
        let s = AttentionShape(batch: 2, seqLen: 2 * LinearAttention.blockRows + 50, heads: 2, headDim: 16)
        try check("SLL", ranks: 2, shape: s, decay: [1])
    }

    /// Per layer forward: L one AllGather of states, S two AllGatherV (K, V); backward the same again plus two
    /// ReduceScatter per S layer, and one all-reduce of every weight gradient; no point-to-point message.
    @Test func communicationPattern() throws {
        let runs = try check("LLS", ranks: 3, shape: AttentionShape(seqLen: 12, heads: 2, headDim: 8), decay: [0.9])
        for r in runs {
            #expect(r.forward[.allGather] == 2 && r.forward[.allGatherV] == 2 && r.forward.collectives == 4 && r.forward.messagesSent == 0, "\(r.forward)")
            #expect(r.backward[.allGather] == 2 && r.backward[.allGatherV] == 2 && r.backward[.reduceScatter] == 2
                    && r.backward[.allReduce] == 1 && r.backward.collectives == 7 && r.backward.messagesSent == 0, "\(r.backward)")
        }
    }

    @Test func badPatternsAreRefused() {
        for (pattern, message) in [("", "--layers is empty"), ("LLX", "'X' is not a layer")] {
            #expect { _ = try HybridStack.layers(pattern) } throws: { "\($0)".contains(message) }
        }
    }
}
