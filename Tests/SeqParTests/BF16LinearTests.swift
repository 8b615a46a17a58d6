// Linear attention in bf16: the chunkwise kernel, LASP-1 and LASP-2 (causal with decay, bidirectional, elu+1) and
// LASP-2H (the hybrid stack), forward and backward, at 1 to 4 ranks on the in-process cluster, against their Double
// definitions (LinearOracle, HybridOracle) on the bf16-rounded inputs: within 2e-2 relative error, both the kernels'
// fp32 results and the run's outputs rounded to bf16. The kernels' own error must also be bf16-sized (above 1e-5,
// where the fp32 path on the same rounded inputs stays near 1e-7), so these tests fail if bf16 silently ran fp32.
// Packed documents too (the oracles with the document mask), within the same 2e-2.
import Testing
@testable import SeqPar

/// Errors against the Double definition of one bf16 tensor: as the kernels left it (fp32) and as a run stores it.
struct BF16Error: CustomStringConvertible {
    var name: String, kernel: Double, rounded: Double
    var description: String { "\(name): kernel \(String(format: "%.2e", kernel)), rounded \(String(format: "%.2e", rounded))" }

    init(_ name: String, _ t: Tensor, _ expected: [Double]) {
        self.name = name
        kernel = relativeError(t, expected)
        let r = t.copy()
        r.roundToBF16()
        rounded = relativeError(r, expected)
    }

    /// Within the bf16 tolerance, and bf16-sized (not an fp32 run in disguise).
    func expectBF16(_ label: String) {
        #expect(kernel <= 2e-2 && rounded <= 2e-2, "\(label) \(self)")
        #expect(kernel > 1e-5, "\(label) \(self): no bf16-sized error, so the products did not run in bf16")
    }
}

@Suite(.enabled(if: OneDNN.isAvailable, "oneDNN (libdnnl) is not installed")) struct BF16LinearTests {
    struct Gathered: @unchecked Sendable { var o: Tensor, dq: Tensor, dk: Tensor, dv: Tensor }

    /// Runs `algorithm` forward and backward in `precision` on inputs rounded to bf16; every rank gathers o, dq, dk, dv
    /// (fp32, as the kernels left them).
    static func run(_ algorithm: AlgorithmName, ranks: Int, shape s: AttentionShape, options: AttentionOptions, precision: Precision,
                    seed: UInt64) throws -> Gathered {
        var options = options
        options.precision = precision
        let o = options
        return try InProcessCluster.run(ranks: ranks, timeout: 60) { comm -> Gathered in
            let positions = o.partition.positions(rank: comm.rank, ranks: comm.size, length: s.seqLen)
            let x = SeededInputs.attention(shape: s, options: o, positions: positions, seed: seed)
            let dO = SeededInputs.gradOut(shape: s, positions: positions, seed: seed)
            for t in [x.q, x.k, x.v, dO] { t.roundToBF16() }
            let implementation = algorithm.implementation
            let out = try implementation.forward(x, comm: comm)
            let grads = try implementation.backward(x, output: out, gradOut: dO, comm: comm)
            let p = o.partition
            return Gathered(o: try p.gather(out.o, length: s.seqLen, comm: comm), dq: try p.gather(grads.dq, length: s.seqLen, comm: comm),
                            dk: try p.gather(grads.dk, length: s.seqLen, comm: comm), dv: try p.gather(grads.dv, length: s.seqLen, comm: comm))
        }[0]
    }

    /// One case: bf16 against the oracle on rounded inputs; `fp32Too` also runs fp32 on the same rounded inputs, which
    /// must stay at fp32 accuracy (the rounded inputs themselves are not the error).
    static func check(_ algorithm: AlgorithmName, ranks: Int, shape s: AttentionShape, causal: Bool, decay: [Double],
                      map: FeatureMap = .identity, seed: UInt64 = 13, fp32Too: Bool = false, documents: Documents? = nil) throws {
        var options = AttentionOptions(causal: causal, decay: decay, featureMap: map)
        options.documents = documents
        let all = Array(0..<s.seqLen)
        let g = SeededInputs.attention(shape: s, options: options, positions: all, seed: seed)
        let dO = SeededInputs.gradOut(shape: s, positions: all, seed: seed)
        for t in [g.q, g.k, g.v, dO] { t.roundToBF16() }
        let d = options.decayPerHead(s.heads).map(Double.init)
        let o = LinearOracle.forward(q: g.q, k: g.k, v: g.v, decay: d, featureMap: map, causal: causal, documents: documents)
        let grads = LinearOracle.backward(q: g.q, k: g.k, v: g.v, gradOut: dO, decay: d, featureMap: map, causal: causal, documents: documents)
        let label = "\(algorithm) P=\(ranks) \(s) \(causal ? "causal" : "bidirectional") decay \(decay) \(map)\(documents.map { " documents \($0.lengths)" } ?? "")"
        let r = try run(algorithm, ranks: ranks, shape: s, options: options, precision: .bf16, seed: seed)
        let errors = [BF16Error("o", r.o, o), BF16Error("dq", r.dq, grads.dq), BF16Error("dk", r.dk, grads.dk), BF16Error("dv", r.dv, grads.dv)]
        for e in errors { e.expectBF16(label) }
        print("bf16 \(label): \(errors.map(\.description).joined(separator: "; "))")
        if fp32Too {
            let f = try run(algorithm, ranks: ranks, shape: s, options: options, precision: .fp32, seed: seed)
            for (name, t, e) in [("o", f.o, o), ("dq", f.dq, grads.dq), ("dk", f.dk, grads.dk), ("dv", f.dv, grads.dv)] {
                #expect(relativeError(t, e) <= 2e-5, "fp32 on rounded inputs, \(label) \(name): \(relativeError(t, e))")
            }
        }
    }

    @Test(arguments: [1, 2, 3, 4], [AlgorithmName.lasp1, .lasp2])
    func laspMatchesOracle(ranks: Int, algorithm: AlgorithmName) throws {
        try OneDNN.require()
        let s = AttentionShape(seqLen: 37, heads: 4, kvHeads: 2, headDim: 16)
        try Self.check(algorithm, ranks: ranks, shape: s, causal: true, decay: [0.95, 0.9, 0.7, 1.0], fp32Too: ranks == 3)
        try Self.check(algorithm, ranks: ranks, shape: s, causal: false, decay: [1])
        try Self.check(algorithm, ranks: ranks, shape: s, causal: true, decay: [0.9], map: .elu1)
    }

    /// Packed documents (one-token ones, a boundary at the 4-rank chunk edge 28, one over several chunks), causal with
    /// decay and bidirectional, and chunks of several blocks with starts at and inside block edges.
    @Test(arguments: [1, 2, 3, 4], [AlgorithmName.lasp1, .lasp2])
    func laspWithDocuments(ranks: Int, algorithm: AlgorithmName) throws {
        try OneDNN.require()
        let s = AttentionShape(seqLen: 37, heads: 4, kvHeads: 2, headDim: 16)
        let documents = try Documents(lengths: [1, 6, 1, 20, 9], seqLen: 37)
        try Self.check(algorithm, ranks: ranks, shape: s, causal: true, decay: [0.95, 0.9, 0.7, 1.0], fp32Too: ranks == 3, documents: documents)
        try Self.check(algorithm, ranks: ranks, shape: s, causal: false, decay: [1], documents: documents)
        try Self.check(algorithm, ranks: ranks, shape: s, causal: true, decay: [0.9], map: .elu1, documents: documents)
        if ranks == 2 {
            let n = LinearAttention.blockRows, c = 2 * n + 37
            let long = AttentionShape(batch: 2, seqLen: 2 * c, heads: 2, kvHeads: 1, headDim: 16)
            let cuts = try Documents(lengths: [40, n - 40, 1, c - n - 1, n, 70, c - n - 70], seqLen: long.seqLen)
            try Self.check(algorithm, ranks: 2, shape: long, causal: true, decay: [0.99, 0.9], seed: 5, documents: cuts)
        }
    }

    /// Chunks of several kernel blocks with a partial last one (the running block state in bf16 products), batch 2.
    @Test func chunksOfSeveralBlocks() throws {
        try OneDNN.require()
        let s = AttentionShape(batch: 2, seqLen: 2 * (2 * LinearAttention.blockRows + 37), heads: 2, kvHeads: 1, headDim: 16)
        try Self.check(.lasp2, ranks: 2, shape: s, causal: true, decay: [0.99, 0.9], seed: 5)
        try Self.check(.lasp2, ranks: 2, shape: s, causal: true, decay: [1], seed: 6)
    }

    /// The states stay fp32 and travel as fp32: LASP-2's AllGather carries the same bytes in both precisions.
    @Test func statesTravelInFP32() throws {
        try OneDNN.require()
        let s = AttentionShape(seqLen: 24, heads: 2, headDim: 8)
        var bytes: [Precision: Int] = [:]
        for precision in Precision.allCases {
            var options = AttentionOptions(causal: true, decay: [0.9])
            options.precision = precision
            let o = options
            bytes[precision] = try InProcessCluster.run(ranks: 3) { comm -> Int in
                let positions = o.partition.positions(rank: comm.rank, ranks: comm.size, length: s.seqLen)
                let x = SeededInputs.attention(shape: s, options: o, positions: positions, seed: 1)
                comm.resetCounters()
                _ = try AlgorithmName.lasp2.implementation.forward(x, comm: comm)
                return comm.counters.bytesSent
            }[0]
        }
        #expect(bytes[.bf16] == bytes[.fp32] && bytes[.fp32] == 2 * 8 * 8 * 4, "\(bytes)")
    }

    // MARK: - LASP-2H

    /// The hybrid stack in bf16 (rounded input and output gradient, bf16 weights) against the Double stack on the same
    /// values: y and dx (rounded to bf16, as HybridRun stores them) and every weight gradient within 2e-2, y's error
    /// bf16-sized; once with packed documents.
    @Test(arguments: [1, 2, 3, 4])
    func hybridMatchesOracle(ranks: Int) throws {
        try OneDNN.require()
        let s = AttentionShape(seqLen: 29, heads: 4, kvHeads: 2, headDim: 8)
        let documents = try Documents(lengths: [1, 7, 1, 12, 8], seqLen: s.seqLen)
        for (pattern, decay, map, docs) in [("LLLS", [0.9, 0.95, 0.99, 1], FeatureMap.identity, nil), ("SLSL", [0.8], .elu1, nil),
                                            ("SLSL", [0.8], .elu1, documents)] {
            let stack = HybridStack(layers: try HybridStack.layers(pattern), shape: s, decay: decay, featureMap: map, seed: 3, precision: .bf16, documents: docs)
            #expect(stack.weights.allSatisfy { $0.all.allSatisfy { t in t.buffer.allSatisfy { BF16.rounded($0) == $0 } } }, "bf16 weights")
            let all = Array(0..<s.seqLen)
            let x = SeededInputs.hidden(.hidden, seed: 3, batch: 1, length: s.seqLen, width: stack.width, positions: all)
            let dY = SeededInputs.hidden(.gradHidden, seed: 3, batch: 1, length: s.seqLen, width: stack.width, positions: all)
            x.roundToBF16(); dY.roundToBF16()
            let ref = HybridOracle.run(stack, x: x, gradOut: dY)
            struct Out: @unchecked Sendable { var y: Tensor, dx: Tensor, dW: [HybridStack.Weights] }
            let out = try InProcessCluster.run(ranks: ranks) { comm -> Out in
                let positions = SequenceLayout.contiguous.positions(rank: comm.rank, ranks: comm.size, length: s.seqLen)
                let xr = SeededInputs.hidden(.hidden, seed: 3, batch: 1, length: s.seqLen, width: stack.width, positions: positions)
                let dYr = SeededInputs.hidden(.gradHidden, seed: 3, batch: 1, length: s.seqLen, width: stack.width, positions: positions)
                xr.roundToBF16(); dYr.roundToBF16()
                let (y, cache) = try stack.forward(xr, positions: positions, comm: comm)
                let (dx, dW) = try stack.backward(cache, gradOut: dYr, comm: comm)
                return Out(y: try SequenceLayout.contiguous.gather(y, length: s.seqLen, comm: comm),
                           dx: try SequenceLayout.contiguous.gather(dx, length: s.seqLen, comm: comm), dW: dW)
            }[0]
            let label = "lasp2h \(pattern) P=\(ranks) \(s)\(docs.map { " documents \($0.lengths)" } ?? "")"
            let y = BF16Error("y", out.y, ref.y), dx = BF16Error("dx", out.dx, ref.dx!)
            y.expectBF16(label)
            #expect(dx.kernel <= 2e-2 && dx.rounded <= 2e-2, "\(label) \(dx)")
            var worstWeight = 0.0
            for (l, w) in out.dW.enumerated() {
                for i in 0..<4 { worstWeight = max(worstWeight, relativeError(w.all[i], ref.dWeights![l][i])) }
            }
            #expect(worstWeight <= 2e-2, "\(label): weight gradients \(worstWeight)")
            print("bf16 \(label): \(y); \(dx); weight gradients \(String(format: "%.2e", worstWeight))")
        }
    }

    /// HybridRun in bf16: --check passes with the bf16 tolerance, and the report says bf16.
    @Test func hybridRunChecksInBF16() throws {
        try OneDNN.require()
        var config = HybridRunConfig(layers: "LS", shape: AttentionShape(seqLen: 20, heads: 2, headDim: 8))
        (config.precision, config.backward, config.check, config.decay) = (.bf16, true, true, [0.9])
        let c = config
        let report = try InProcessCluster.run(ranks: 2) { try HybridRun.execute(c, comm: $0, backend: "test") }[0]
        let check = try #require(report.check)
        #expect(report.precision == .bf16 && check.passed && check.forwardTolerance == 2e-2 && check.forwardError > 1e-5, "\(check.summary)")
    }
}
