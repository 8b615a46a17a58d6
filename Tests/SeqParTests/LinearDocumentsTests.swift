// Linear attention over packed documents: the chunkwise kernel alone with boundaries inside a chunk, then LASP-1 and
// LASP-2 forward and backward on the in-process cluster at 1, 2, 3, 4 and 8 ranks, against the Double oracle with the
// document mask (LinearOracle: o_s sums over j <= s of s's document only). Documents shorter than a chunk, longer than
// several chunks, boundaries exactly at chunk and block edges, one-token documents, a document per token; decay 1,
// 0.9 and per head; identity and elu+1; GQA; causal and bidirectional; uneven shares; recomputed state. Tolerances of
// DESIGN §6 (forward 2e-5, gradients 1e-4, relative to the oracle's max magnitude). Also: one document is no
// documents bit for bit, LASP-1 = LASP-2 bit for bit, LASP-2 still one AllGather per pass, and the library path of
// `seqpar attention --algorithm lasp2 --doc-lens 500,501 --decay 0.9 --check` at 3 ranks.
import Foundation
import PropertyBased
import Testing
@testable import SeqPar

@Suite struct LinearDocumentsTests {
    /// Documents for `length` tokens on `ranks` equal ranks: one per chunk (every boundary exactly at a chunk edge);
    /// short ones with one-token documents (1 + 6 + 1 + 20 + 9: at 4 ranks a boundary at the chunk edge 28 too);
    /// one longer than several chunks; one per token.
    static func documentSets(length: Int = 37, ranks: Int) throws -> [Documents] {
        precondition(length == 37)
        let edges = SequenceLayout.contiguous.counts(ranks: ranks, length: length).filter { $0 > 0 }
        return try [edges, [1, 6, 1, 20, 9], [30, 7], [Int](repeating: 1, count: length)].map { try Documents(lengths: $0, seqLen: length) }
    }

    /// The oracle with documents is the oracle run on each document by itself, concatenated (forward and gradients,
    /// to Double rounding), causal with decay and bidirectional, GQA.
    @Test(arguments: [(true, [0.9, 0.7]), (false, [1.0, 1.0])])
    func oracleIsPerDocument(causal: Bool, decay: [Double]) throws {
        let s = AttentionShape(seqLen: 20, heads: 2, kvHeads: 1, headDim: 4)
        let lengths = [3, 1, 9, 7]
        let all = Array(0..<s.seqLen)
        let x = SeededInputs.attention(shape: s, options: AttentionOptions(), positions: all, seed: 9)
        let dO = SeededInputs.gradOut(shape: s, positions: all, seed: 9)
        let documents = try Documents(lengths: lengths, seqLen: s.seqLen)
        let o = LinearOracle.forward(q: x.q, k: x.k, v: x.v, decay: decay, featureMap: .elu1, causal: causal, documents: documents)
        let g = LinearOracle.backward(q: x.q, k: x.k, v: x.v, gradOut: dO, decay: decay, featureMap: .elu1, causal: causal, documents: documents)
        var pieces: (o: [Double], dq: [Double], dk: [Double], dv: [Double]) = ([], [], [], [])
        var first = 0
        for n in lengths {
            func cut(_ t: Tensor) -> Tensor { t.reshaped(Array(t.shape.dropFirst())).rows(first..<(first + n)).copy().reshaped([1, n] + t.shape.dropFirst(2)) }
            let (q, k, v, d) = (cut(x.q), cut(x.k), cut(x.v), cut(dO))
            pieces.o += LinearOracle.forward(q: q, k: k, v: v, decay: decay, featureMap: .elu1, causal: causal)
            let p = LinearOracle.backward(q: q, k: k, v: v, gradOut: d, decay: decay, featureMap: .elu1, causal: causal)
            (pieces.dq, pieces.dk, pieces.dv) = (pieces.dq + p.dq, pieces.dk + p.dk, pieces.dv + p.dv)
            first += n
        }
        for (name, a, b) in [("o", o, pieces.o), ("dq", g.dq, pieces.dq), ("dk", g.dk, pieces.dk), ("dv", g.dv, pieces.dv)] {
            #expect(a.count == b.count && zip(a, b).allSatisfy { abs($0 - $1) <= 1e-12 * max(1, abs($1)) }, "\(name)")
        }
    }

    /// The kernel alone on one chunk of several blocks (no ranks, no states from outside): boundaries inside a block,
    /// exactly at the block edges n and 2n, one row after one (a one-token document at n); all four products of the
    /// pass (o and dq forward, dk and dv reverse), GQA, against the oracle: forward 2e-5, gradients 1e-4.
    @Test(arguments: [[1.0], [0.9, 0.99]])
    func kernelRestartsAtDocumentStarts(decay: [Double]) throws {
        let n = LinearAttention.blockRows
        let s = AttentionShape(seqLen: 2 * n + 37, heads: 2, kvHeads: 1, headDim: 16)
        let documents = try Documents(lengths: [50, n - 50, 1, 60, n - 61, 37], seqLen: s.seqLen)
        let starts = [50, n, n + 1, n + 61, 2 * n]
        #expect(documents.offsets.dropFirst().dropLast().map { $0 } == starts)
        let all = Array(0..<s.seqLen)
        let options = AttentionOptions(causal: true, decay: decay)
        let x = SeededInputs.attention(shape: s, options: options, positions: all, seed: 21)
        let dO = SeededInputs.gradOut(shape: s, positions: all, seed: 21)
        let lambda = options.decayPerHead(s.heads)
        let d = lambda.map(Double.init)
        let o = LinearOracle.forward(q: x.q, k: x.k, v: x.v, decay: d, featureMap: .identity, causal: true, documents: documents)
        let g = LinearOracle.backward(q: x.q, k: x.k, v: x.v, gradOut: dO, decay: d, featureMap: .identity, causal: true, documents: documents)
        for precision in Precision.allCases where precision == .fp32 || OneDNN.isAvailable {
            // bf16: the same products on bf16-rounded copies, against the oracle on the unrounded inputs: within 2e-2.
            let (q, k, v, go) = (x.q.copy(), x.k.copy(), x.v.copy(), dO.copy())
            if precision == .bf16 { try OneDNN.require(); for t in [q, k, v, go] { t.roundToBF16() } }
            let (out, dq, dk, dv) = (Tensor(zeros: q.shape), Tensor(zeros: q.shape), Tensor(zeros: k.shape), Tensor(zeros: v.shape))
            func run(_ a: Tensor, _ b: Tensor, _ c: Tensor, _ direction: LinearAttention.Direction, _ into: Tensor) {
                LinearAttention.chunk(a, b, c, heads: s.heads, decay: lambda, direction: direction, starts: starts, precision: precision, into: into)
            }
            run(q, k, v, .forward, out)
            run(go, v, k, .forward, dq)
            run(v, go, q, .reverse, dk)
            run(k, q, go, .reverse, dv)
            let (forward, gradient) = precision == .fp32 ? (2e-5, 1e-4) : (2e-2, 2e-2)
            for (name, t, expected, tolerance) in [("o", out, o, forward), ("dq", dq, g.dq, gradient), ("dk", dk, g.dk, gradient), ("dv", dv, g.dv, gradient)] {
                #expect(relativeError(t, expected) <= tolerance, "\(precision) decay \(decay) \(name): relative error \(relativeError(t, expected))")
            }
        }
        // The mask really cuts: without the starts the kernel's output differs from the document oracle by far more.
        let plain = Tensor(zeros: x.q.shape)
        LinearAttention.chunk(x.q, x.k, x.v, heads: s.heads, decay: lambda, direction: .forward, into: plain)
        #expect(relativeError(plain, o) > 1e-2)
    }

    @Test(arguments: [1, 2, 3, 4, 8], [AlgorithmName.lasp1, .lasp2])
    func matchesOracle(ranks: Int, algorithm: AlgorithmName) throws {
        let s = AttentionShape(seqLen: 37, heads: 4, kvHeads: 2, headDim: 16)
        for documents in try Self.documentSets(ranks: ranks) {
            for (causal, decay) in [(true, [1.0]), (true, [0.9]), (true, [0.95, 0.9, 0.7, 1.0]), (false, [1.0])] {
                for map in FeatureMap.allCases {
                    try checkLinear(LinearCase(algorithm: algorithm, ranks: ranks, shape: s, causal: causal, decay: decay, featureMap: map, documents: documents))
                }
            }
        }
    }

    /// Chunks of several kernel blocks, batch 2: starts inside rank 0's first block, at its block edge n and one row
    /// after (a one-token document), exactly at the chunk edge c, at rank 1's block edge c + n and inside its second
    /// block; then one document that crosses the chunk edge.
    @Test(arguments: [AlgorithmName.lasp1, .lasp2])
    func chunksOfSeveralBlocks(algorithm: AlgorithmName) throws {
        let n = LinearAttention.blockRows, c = 2 * n + 37
        let s = AttentionShape(batch: 2, seqLen: 2 * c, heads: 2, kvHeads: 1, headDim: 16)
        for lengths in [[40, n - 40, 1, c - n - 1, n, 70, c - n - 70], [100, 2 * c - 100]] {
            let documents = try Documents(lengths: lengths, seqLen: s.seqLen)
            for (causal, decay, map) in [(true, [0.99, 0.9], FeatureMap.elu1), (true, [1.0], .identity), (false, [1.0], .identity)] {
                try checkLinear(LinearCase(algorithm: algorithm, ranks: 2, shape: s, causal: causal, decay: decay, featureMap: map, documents: documents))
            }
        }
    }

    /// Uneven shares (one rank may hold no token) and a backward pass that recomputes the forward exchange.
    @Test(arguments: [AlgorithmName.lasp1, .lasp2])
    func unevenSharesAndRecomputedState(algorithm: AlgorithmName) throws {
        let s = AttentionShape(seqLen: 41, heads: 2, headDim: 8)
        let documents = try Documents(lengths: [3, 17, 1, 20], seqLen: 41)
        for shares in [[0.4, 2.1, 0.9], [1.0, 0.01, 1.99]] {
            for causal in [true, false] {
                try checkLinear(LinearCase(algorithm: algorithm, ranks: 3, shape: s, causal: causal, decay: causal ? [0.9] : [1], shares: shares, documents: documents))
            }
        }
        for causal in [true, false] {
            try checkLinear(LinearCase(algorithm: algorithm, ranks: 3, shape: s, causal: causal, decay: causal ? [0.8] : [1], dropSaved: true, documents: documents))
        }
    }

    /// Random lengths, rank counts, cuts into documents (each token starts one with probability about 1/4), decay,
    /// map and direction: both algorithms still match the definition.
    @Test func randomDocumentsMatchOracle() async {
        await propertyCheck(count: 30, input: Gen.int(in: 1...40), Gen.int(in: 1...6), Gen.int(in: 0...1_000_000), Gen.int(in: 500...1000), Gen.bool, Gen.bool) {
            length, ranks, cuts, decayMilli, causal, elu in
            var lengths: [Int] = [], current = 0, bits = UInt64(cuts) &* 0x9E37_79B9_7F4A_7C15
            for _ in 0..<length {
                current += 1
                bits = bits &* 6364136223846793005 &+ 1442695040888963407
                if bits >> 62 == 0 { lengths.append(current); current = 0 }
            }
            if current > 0 { lengths.append(current) }
            let shape = AttentionShape(seqLen: length, heads: 4, kvHeads: 2, headDim: 8)
            for algorithm in [AlgorithmName.lasp2, .lasp1] {
                #expect(throws: Never.self) {
                    try checkLinear(LinearCase(algorithm: algorithm, ranks: ranks, shape: shape, causal: causal, decay: [causal ? Double(decayMilli) / 1000 : 1],
                                               featureMap: elu ? .elu1 : .identity, documents: try Documents(lengths: lengths, seqLen: length)))
                }
            }
        }
    }

    /// One document (`Documents(single:)`) is no documents: the same bits and the same messages.
    @Test(arguments: [AlgorithmName.lasp1, .lasp2])
    func oneDocumentIsNoDocuments(algorithm: AlgorithmName) throws {
        let s = AttentionShape(seqLen: 53, heads: 2, headDim: 16)
        for (causal, decay) in [(true, [0.9]), (false, [1.0])] {
            let plain = try checkLinear(LinearCase(algorithm: algorithm, ranks: 3, shape: s, causal: causal, decay: decay))
            let single = try checkLinear(LinearCase(algorithm: algorithm, ranks: 3, shape: s, causal: causal, decay: decay, documents: Documents(single: s.seqLen)))
            let (a, b) = (plain[0].gathered, single[0].gathered)
            for (name, x, y) in [("o", a.o, b.o), ("dq", a.dq, b.dq), ("dk", a.dk, b.dk), ("dv", a.dv, b.dv)] {
                #expect(x.toArray() == y.toArray(), "\(algorithm) \(causal ? "causal" : "bidirectional"): one document differs from none in \(name)")
            }
            for pass in [\RankResult.counters.forward, \RankResult.counters.backward] {
                let traffic = { (r: [RankResult]) in r.map { [$0[keyPath: pass].bytesSent, $0[keyPath: pass].messagesSent, $0[keyPath: pass].collectives] } }
                #expect(traffic(plain) == traffic(single))
            }
        }
    }

    /// LASP-2 with documents: still exactly one AllGather per pass and no point-to-point message; causal sends one
    /// D x D state per head (as without documents), bidirectional two (a chunk's head and tail pieces), whatever L.
    /// LASP-1: P-1 chain messages per pass causal, 2(P-1) bidirectional, no collective.
    @Test(arguments: [1, 2, 3, 4])
    func communicationPattern(ranks: Int) throws {
        for causal in [true, false] {
            var bytes: [Int] = []
            for length in [24, 48] {
                let s = AttentionShape(seqLen: length, heads: 2, headDim: 8)
                let documents = try Documents(lengths: [5, 1, 10, length - 16], seqLen: length)
                let results = try checkLinear(LinearCase(ranks: ranks, shape: s, causal: causal, decay: causal ? [0.9] : [1], documents: documents))
                for (r, result) in results.enumerated() {
                    for (pass, c) in [("forward", result.counters.forward), ("backward", result.counters.backward)] {
                        #expect(c[.allGather] == 1 && c.collectives == 1 && c.messagesSent == 0 && c.messagesReceived == 0, "rank \(r) \(pass) \(c)")
                        #expect(c.bytesSent == (causal ? 1 : 2) * s.batch * s.heads * s.headDim * s.headDim * 4, "rank \(r) \(pass) \(c)")
                    }
                }
                bytes.append(results[0].counters.forward.bytesSent + results[0].counters.backward.bytesSent)
                let chain = try checkLinear(LinearCase(algorithm: .lasp1, ranks: ranks, shape: s, causal: causal, decay: causal ? [0.9] : [1], documents: documents))
                for pass in [\RankResult.counters.forward, \RankResult.counters.backward] {
                    let sent = chain.map { $0[keyPath: pass].messagesSent }.reduce(0, +)
                    #expect(sent == (causal ? 1 : 2) * (ranks - 1), "LASP-1 \(causal ? "causal" : "bidirectional") sent \(sent) messages")
                    #expect(chain.allSatisfy { $0[keyPath: pass].collectives == 0 })
                }
            }
            #expect(bytes[0] == bytes[1], "LASP-2 bytes changed with L: \(bytes)")
        }
    }

    /// The chain and the AllGather fold the same states in the same order, restarts included: identical bits.
    @Test(arguments: [(true, [0.9]), (false, [1.0])])
    func lasp1EqualsLasp2(causal: Bool, decay: [Double]) throws {
        let s = AttentionShape(seqLen: 53, heads: 2, headDim: 16)
        let documents = try Documents(lengths: [7, 1, 30, 2, 13], seqLen: 53)
        let a = try checkLinear(LinearCase(algorithm: .lasp1, ranks: 4, shape: s, causal: causal, decay: decay, documents: documents))[0].gathered
        let b = try checkLinear(LinearCase(algorithm: .lasp2, ranks: 4, shape: s, causal: causal, decay: decay, documents: documents))[0].gathered
        for (name, x, y) in [("o", a.o, b.o), ("dq", a.dq, b.dq), ("dk", a.dk, b.dk), ("dv", a.dv, b.dv)] {
            #expect(x.toArray() == y.toArray(), "LASP-1 and LASP-2 differ in \(name)")
        }
    }

    /// Where each rank's chunk has its document starts, from the documents and the counts alone.
    @Test func chunkDocuments() throws {
        let d = try Documents(lengths: [3, 7, 1, 9], seqLen: 20)  // starts 3, 10, 11
        let c = ChunkDocuments(d, counts: [5, 5, 0, 10])  // chunks [0,5) [5,10) [10,10) [10,20)
        #expect(c.starts == [[3], [], [], [0, 1]])
        #expect(c.restarts == [true, false, false, true])
        #expect(c.head(0) == 0..<3 && c.tail(0) == 3..<5 && c.head(1) == 0..<5 && c.tail(1) == 0..<5 && c.head(3) == 0..<0 && c.tail(3) == 1..<10)
        #expect(c.inner(3) == [0..<1] && c.inner(0).isEmpty)
        #expect(ChunkDocuments(Documents(single: 20), counts: [10, 10]).starts == [[], []])
        #expect(ChunkDocuments(nil, counts: [10, 10]).starts == [[], []])
    }

    /// Documents that do not cover the sequence are refused on every rank before any message, naming the fix.
    @Test func documentsMustCoverTheSequence() throws {
        let s = AttentionShape(seqLen: 20, heads: 2, headDim: 8)
        var options = AttentionOptions(causal: true)
        options.documents = try Documents(lengths: [10, 11], seqLen: 21)
        let o = options
        let sent = try InProcessCluster.run(ranks: 2) { comm -> Int in
            let x = SeededInputs.attention(shape: s, options: o, positions: o.partition.positions(rank: comm.rank, ranks: 2, length: 20), seed: 1)
            comm.resetCounters()
            #expect { _ = try AlgorithmName.lasp2.implementation.forward(x, comm: comm) } throws: { "\($0)".contains("cover 21 tokens") && "\($0)".contains("the sequence has 20") }
            return comm.counters.bytesSent + comm.counters.collectives
        }
        #expect(sent == [0, 0])
    }

    /// The library path of the issue's acceptance command, `mpirun -np 3 seqpar attention --algorithm lasp2
    /// --doc-lens 500,501 --decay 0.9 --check` (with --backward): the run's own oracle check passes at 3 ranks.
    @Test func acceptanceRun() throws {
        var config = AttentionRunConfig(algorithm: .lasp2, shape: AttentionShape(seqLen: 1001, heads: 2, headDim: 16),
                                        options: AttentionOptions(causal: true, decay: [0.9]))
        config.options.documents = try Documents(lengths: [500, 501], seqLen: 1001)
        (config.check, config.backward) = (true, true)
        let c = config
        let reports = try InProcessCluster.run(ranks: 3, timeout: 120) { try AttentionRun.execute(c, comm: $0, backend: "test") }
        let check = try #require(reports[0].check)
        #expect(check.passed && check.forwardError <= 2e-5 && (check.dqError ?? 1) <= 1e-4, "\(check)")
    }
}
