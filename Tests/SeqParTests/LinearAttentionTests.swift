// LASP-1 and LASP-2 (linear attention across ranks), forward and backward, against the Double oracle computed from
// the definition (LinearOracle: the O(L^2) masked sum with decay powers), on the in-process cluster at 1, 2, 3, 4
// and 8 ranks: decay 1, 0.9 and per head, causal and bidirectional, both feature maps, L not divisible by P, one
// token per rank, D in 16/64/128, GQA, chunks of several blocks. Plus the oracle's own finite-difference check,
// the communication pattern, LASP-1 = LASP-2 bit for bit, and long-decay stability.
import Foundation
import PropertyBased
import Testing
@testable import SeqPar

struct LinearCase: CustomStringConvertible, Sendable {
    var algorithm: AlgorithmName = .lasp2
    var ranks: Int
    var shape: AttentionShape
    var causal = true
    var decay: [Double] = [1]
    var featureMap: FeatureMap = .identity
    var seed: UInt64 = 11
    var dropSaved = false
    var shares: [Double]?
    /// Packed documents (nil: one).
    var documents: Documents?
    var options: AttentionOptions {
        var o = AttentionOptions(causal: causal, decay: decay, featureMap: featureMap)
        o.shares = shares
        o.documents = documents
        return o
    }
    var description: String {
        "\(algorithm) P=\(ranks) \(shape) \(causal ? "causal" : "bidirectional") decay \(decay) \(featureMap)\(documents.map { " documents \($0.lengths)" } ?? "")"
    }
}

/// Runs `c` on the cluster and checks every rank's slices and the gathered tensors against the linear oracle.
@discardableResult
func checkLinear(_ c: LinearCase, tolerance: Tolerance = Tolerance()) throws -> [RankResult] {
    let s = c.shape
    let all = Array(0..<s.seqLen)
    let g = SeededInputs.attention(shape: s, options: c.options, positions: all, seed: c.seed)
    let dO = SeededInputs.gradOut(shape: s, positions: all, seed: c.seed)
    let decay = c.options.decayPerHead(s.heads).map(Double.init)
    let o = LinearOracle.forward(q: g.q, k: g.k, v: g.v, decay: decay, featureMap: c.featureMap, causal: c.causal, documents: c.documents)
    let grads = LinearOracle.backward(q: g.q, k: g.k, v: g.v, gradOut: dO, decay: decay, featureMap: c.featureMap, causal: c.causal,
                                      documents: c.documents)
    let results = try runOnCluster(c.algorithm.implementation, ranks: c.ranks, shape: s, options: c.options, seed: c.seed, dropSaved: c.dropSaved)
    expectMatches(results, o: o, dq: grads.dq, dk: grads.dk, dv: grads.dv, shape: s, tolerance: tolerance, "\(c)")
    return results
}

@Suite struct LinearAttentionTests {
    /// The oracle's gradients against central finite differences of Σ dO · o, in Double.
    @Test(arguments: [(true, [0.9, 0.6], FeatureMap.identity), (true, [1.0], .elu1), (false, [1.0], .elu1), (true, [0.8], .elu1)])
    func oracleGradientsMatchFiniteDifferences(causal: Bool, decay: [Double], map: FeatureMap) {
        let s = AttentionShape(seqLen: 6, heads: 2, kvHeads: 1, headDim: 3)
        let x = SeededInputs.attention(shape: s, options: AttentionOptions(), positions: Array(0..<6), seed: 5)
        let dO = SeededInputs.gradOut(shape: s, positions: Array(0..<6), seed: 5)
        let d = decay.count == 1 ? [decay[0], decay[0]] : decay
        let grads = LinearOracle.backward(q: x.q, k: x.k, v: x.v, gradOut: dO, decay: d, featureMap: map, causal: causal)
        func loss() -> Double {
            zip(LinearOracle.forward(q: x.q, k: x.k, v: x.v, decay: d, featureMap: map, causal: causal), dO.toArray()).map { $0 * Double($1) }.reduce(0, +)
        }
        for (t, analytic) in [(x.q, grads.dq), (x.k, grads.dk), (x.v, grads.dv)] {
            for i in stride(from: 0, to: t.count, by: 5) {
                let keep = t.pointer[i]
                let h: Float = 1e-2
                t.pointer[i] = keep + h; let up = loss()
                t.pointer[i] = keep - h; let down = loss()
                t.pointer[i] = keep
                let numeric = (up - down) / (2 * Double(h))
                // Float inputs move by Float steps: compare with the step actually taken.
                #expect(abs(numeric - analytic[i]) <= 2e-3 * max(1, abs(analytic[i])), "element \(i): numeric \(numeric) analytic \(analytic[i])")
            }
        }
    }

    @Test(arguments: [1, 2, 3, 4, 8], [AlgorithmName.lasp1, .lasp2])
    func matchesOracle(ranks: Int, algorithm: AlgorithmName) throws {
        let s = AttentionShape(seqLen: 37, heads: 4, kvHeads: 2, headDim: 16)
        for (causal, decay) in [(true, [1.0]), (true, [0.9]), (true, [0.95, 0.9, 0.7, 1.0]), (false, [1.0])] {
            for map in FeatureMap.allCases {
                try checkLinear(LinearCase(algorithm: algorithm, ranks: ranks, shape: s, causal: causal, decay: decay, featureMap: map))
            }
        }
    }

    @Test(arguments: [16, 64, 128])
    func headDims(headDim: Int) throws {
        try checkLinear(LinearCase(ranks: 3, shape: AttentionShape(seqLen: 29, heads: 2, headDim: headDim), decay: [0.9]))
    }

    /// One token per rank, and chunks of several blocks (C > blockRows, with a partial last block), batch 2.
    @Test func chunkExtremes() throws {
        try checkLinear(LinearCase(ranks: 4, shape: AttentionShape(seqLen: 4, heads: 2, headDim: 8), decay: [0.9]))
        try checkLinear(LinearCase(ranks: 8, shape: AttentionShape(seqLen: 8, heads: 1, headDim: 8), causal: false))
        let long = AttentionShape(batch: 2, seqLen: 2 * (2 * LinearAttention.blockRows + 37), heads: 2, kvHeads: 1, headDim: 16)
        try checkLinear(LinearCase(ranks: 2, shape: long, decay: [0.99, 0.9], featureMap: .elu1))
        try checkLinear(LinearCase(ranks: 2, shape: long, decay: [1.0]))
    }

    /// Tokens split by shares (a fast rank holding most of the chunk, a slow one a few tokens, one share so small it
    /// rounds to no token): the chunks' states still carry the decay over each rank's own length.
    @Test(arguments: [AlgorithmName.lasp1, .lasp2])
    func unevenShares(algorithm: AlgorithmName) throws {
        for shares in [[0.4, 2.1, 0.9], [1.0, 0.01, 1.99]] {
            try checkLinear(LinearCase(algorithm: algorithm, ranks: 3, shape: AttentionShape(seqLen: 41, heads: 2, headDim: 8), decay: [0.9], shares: shares))
        }
    }

    /// Without the forward pass's saved state, backward recomputes it (one more exchange) and still matches.
    @Test(arguments: [AlgorithmName.lasp1, .lasp2])
    func backwardWithoutSavedState(algorithm: AlgorithmName) throws {
        try checkLinear(LinearCase(algorithm: algorithm, ranks: 3, shape: AttentionShape(seqLen: 20, heads: 2, headDim: 8), decay: [0.8], dropSaved: true))
    }

    /// LASP-2: one AllGather forward, one backward, no point-to-point; its bytes do not change when L doubles.
    /// LASP-1: P-1 chain messages forward and backward (2(P-1) bidirectional), no collective.
    @Test(arguments: [1, 2, 3, 4])
    func communicationPattern(ranks: Int) throws {
        var bytes: [Int] = []
        for length in [24, 48] {
            let s = AttentionShape(seqLen: length, heads: 2, headDim: 8)
            let results = try checkLinear(LinearCase(ranks: ranks, shape: s, decay: [0.9]))
            for (r, result) in results.enumerated() {
                for (pass, c) in [("forward", result.counters.forward), ("backward", result.counters.backward)] {
                    #expect(c[.allGather] == 1 && c.collectives == 1 && c.messagesSent == 0 && c.messagesReceived == 0, "rank \(r) \(pass) \(c)")
                    #expect(c.bytesSent == s.batch * s.heads * s.headDim * s.headDim * 4, "rank \(r) \(pass) sends one D x D state per head")
                }
            }
            bytes.append(results[0].counters.forward.bytesSent + results[0].counters.backward.bytesSent)
        }
        #expect(bytes[0] == bytes[1], "LASP-2 bytes changed with L: \(bytes)")
        for causal in [true, false] {
            let results = try checkLinear(LinearCase(algorithm: .lasp1, ranks: ranks, shape: AttentionShape(seqLen: 24, heads: 2, headDim: 8), causal: causal))
            let sent = results.map { $0.counters.forward.messagesSent }.reduce(0, +)
            #expect(sent == (causal ? 1 : 2) * (ranks - 1), "LASP-1 \(causal ? "causal" : "bidirectional") forward sent \(sent) messages")
            #expect(results.allSatisfy { $0.counters.forward.collectives == 0 && $0.counters.backward.collectives == 0 })
        }
    }

    /// Random shapes and rank counts (L from 1, so ranks may hold no token; GQA; decay in (0.5, 1]; either map):
    /// LASP-2 and LASP-1 still match the definition.
    @Test func randomShapesMatchOracle() async {
        await propertyCheck(count: 25, input: Gen.int(in: 1...40), Gen.int(in: 1...6), Gen.int(in: 0...2), Gen.int(in: 1...24), Gen.int(in: 500...1000), Gen.bool) {
            length, ranks, groups, dim, decayMilli, elu in
            let kvHeads = 1 << groups
            let shape = AttentionShape(seqLen: length, heads: 2 * kvHeads, kvHeads: kvHeads, headDim: dim)
            for algorithm in [AlgorithmName.lasp2, .lasp1] {
                #expect(throws: Never.self) {
                    try checkLinear(LinearCase(algorithm: algorithm, ranks: ranks, shape: shape, decay: [Double(decayMilli) / 1000],
                                               featureMap: elu ? .elu1 : .identity))
                }
            }
        }
    }

    /// Where each exchange puts the state and inter-chunk products: LASP-2 forms its state before any exchange and
    /// adds the inter-chunk term after the AllGather; LASP-1 (the paper's order) adds the inter-chunk term as soon
    /// as the previous rank's state arrives, then forms its own state, then sends it on, so rank r's send follows
    /// rank r-1's: the products sit on the chain's dependent path.
    @Test(arguments: [StateExchange.allGather, .chain])
    func exchangeOrdersTheProductsAsItsPaperDoes(exchange: StateExchange) throws {
        let (p, shape) = (4, [1, 1, 2, 2])
        let log = try InProcessCluster.run(ranks: p, timeout: 60) { comm -> [String] in
            var events: [String] = []
            let r = Float(comm.rank + 1)
            let pending = try exchange.start({ events.append("state"); return Tensor(shape: shape, values: [Float](repeating: r, count: 4)) },
                                             shape: shape, fold: .prefix, counts: [1, 1, 1, 1], decay: [1], comm: comm)
            events.append("started")
            let prefix = try pending.finish { s in events.append("inter \(Int(s.toArray()[0]))") }
            events.append("done \(Int(prefix.toArray()[0]))")
            return events
        }
        for (r, events) in log.enumerated() {
            let sum = r * (r + 1) / 2  // states 1 ... r of the ranks before
            #expect(events == (exchange == .allGather ? ["state", "started", "inter \(sum)", "done \(sum)"]
                                                      : ["started", "inter \(sum)", "state", "done \(sum)"]), "rank \(r): \(events)")
        }
    }

    /// The two exchanges fold the same states in the same order: identical bits.
    @Test(arguments: [(true, [0.9]), (false, [1.0])])
    func lasp1EqualsLasp2(causal: Bool, decay: [Double]) throws {
        let s = AttentionShape(seqLen: 53, heads: 2, headDim: 16)
        let a = try checkLinear(LinearCase(algorithm: .lasp1, ranks: 4, shape: s, causal: causal, decay: decay))[0].gathered
        let b = try checkLinear(LinearCase(algorithm: .lasp2, ranks: 4, shape: s, causal: causal, decay: decay))[0].gathered
        for (name, x, y) in [("o", a.o, b.o), ("dq", a.dq, b.dq), ("dk", a.dk, b.dk), ("dv", a.dv, b.dv)] {
            #expect(x.toArray() == y.toArray(), "LASP-1 and LASP-2 differ in \(name)")
        }
    }

    /// Decay weights are 0 or at least 1e-30, never subnormal fp32 (which makes sgemm crawl on x86), for every decay
    /// and exponent a chunk of up to 300k tokens can ask for; and they equal λ^e in Double to fp32 rounding above it.
    @Test func decayPowersAreNeverSubnormal() {
        for lambda: Float in [0.5, 0.9, 0.99, 0.999, 0.9999, 1] {
            let exponents = Array(stride(from: 0, to: 300_000, by: 7))
            let w = LinearAttention.powers(lambda, exponents)
            for (e, x) in zip(exponents, w) {
                #expect(x == 0 || x >= 1e-30, "λ=\(lambda), e=\(e): \(x)")
                #expect(x.isFinite && !x.isSubnormal)
                let exact = Foundation.pow(Double(lambda), Double(e))
                if exact >= 1e-30 { #expect(abs(Double(x) - exact) <= 1e-7 * exact, "λ=\(lambda), e=\(e)") }
            }
        }
    }

    /// λ = 0.5 over 100k tokens: powers underflow to 0, never to NaN; sampled rows (chunk edges included) match the
    /// definition summed over the last 300 tokens (0.5^300 is below 1e-90, far under the tolerance).
    @Test func longDecayIsStable() throws {
        let s = AttentionShape(seqLen: 100_000, heads: 1, headDim: 16)
        let c = LinearCase(ranks: 2, shape: s, decay: [0.5])
        let results = try runOnCluster(c.algorithm.implementation, ranks: 2, shape: s, options: c.options, seed: c.seed)
        let o = results[0].gathered.o
        for t in [o, results[0].gathered.dq, results[0].gathered.dk, results[0].gathered.dv] {
            #expect(t.firstNonFinite() == nil, "non-finite value at \(t.firstNonFinite().map { t.multiIndex($0) } ?? [])")
        }
        let x = SeededInputs.attention(shape: s, options: c.options, positions: Array(0..<s.seqLen), seed: c.seed)
        let d = s.headDim
        var worst = 0.0, scale = 0.0
        for row in [0, 1, 299, 49_999, 50_000, 50_001, 77_777, 99_999] {
            for e in 0..<d {
                var sum = 0.0
                for j in max(0, row - 300)...row {
                    var dot = 0.0
                    for i in 0..<d { dot += Double(x.q.pointer[row * d + i]) * Double(x.k.pointer[j * d + i]) }
                    sum += Foundation.pow(0.5, Double(row - j)) * dot * Double(x.v.pointer[j * d + e])
                }
                worst = max(worst, abs(Double(o.pointer[row * d + e]) - sum))
                scale = max(scale, abs(sum))
            }
        }
        #expect(worst / scale <= 2e-5, "long decay: relative error \(worst / scale)")
    }
}
