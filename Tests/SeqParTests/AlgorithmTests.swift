// dense, allgather, ring, rsa and ulysses, forward and backward, against the Double oracle on the in-process cluster at 1, 2, 3, 4
// and 8 ranks, with the shapes that bite: L not divisible by P (or 2P), L = P, L < P, GQA/MQA, D in 16/64/128/192,
// batch 2, causal and not, zigzag, and inputs scaled by 30 (large logits).
import Testing
@testable import SeqPar

@Suite struct AlgorithmTests {
    static let rankCounts = [1, 2, 3, 4, 8]

    static let distributed: [AlgorithmName] = [.allgather, .ring, .rsa, .ulysses]

    /// A GQA shape every algorithm runs at `ranks` (Ulysses needs P | kv heads: 2P heads over P kv heads).
    static func gqaShape(_ algorithm: AlgorithmName, ranks: Int, seqLen: Int = 37, headDim: Int = 16) -> AttentionShape {
        algorithm == .ulysses ? AttentionShape(seqLen: seqLen, heads: 2 * ranks, kvHeads: ranks, headDim: headDim)
                              : AttentionShape(seqLen: seqLen, heads: 4, kvHeads: 2, headDim: headDim)
    }

    @Test(arguments: rankCounts, distributed)
    func distributedMatchesOracle(ranks: Int, algorithm: AlgorithmName) throws {
        for causal in [false, true] {
            for layout in SequenceLayout.allCases {
                try checkAttention(AttentionCase(algorithm: algorithm, ranks: ranks, shape: Self.gqaShape(algorithm, ranks: ranks),
                                                 causal: causal, layout: layout))
            }
        }
    }

    @Test(arguments: [16, 64, 128, 192], distributed)
    func headDims(headDim: Int, algorithm: AlgorithmName) throws {
        try checkAttention(AttentionCase(algorithm: algorithm, ranks: 3, shape: Self.gqaShape(algorithm, ranks: 3, seqLen: 29, headDim: headDim),
                                         causal: true, layout: .zigzag))
    }

    /// Tokens split by shares (`SpeedBalance`): uneven chunks, under both layouts, causal and not, forward and
    /// backward, still match the oracle; a share small enough to round to no token leaves that rank empty.
    @Test(arguments: distributed)
    func unevenShares(algorithm: AlgorithmName) throws {
        for (ranks, shares) in [(3, [0.4, 2.1, 0.9]), (4, [1.0, 0.02, 1.5, 1.48])] {
            for causal in [false, true] {
                for layout in SequenceLayout.allCases {
                    try checkAttention(AttentionCase(algorithm: algorithm, ranks: ranks, shape: Self.gqaShape(algorithm, ranks: ranks, seqLen: 45),
                                                     causal: causal, layout: layout, shares: shares))
                }
            }
        }
    }

    /// Shares that do not fit the job are refused before any work, naming the fix.
    @Test func sharesAreChecked() throws {
        let s = AttentionShape(seqLen: 12, heads: 2, headDim: 8)
        for (shares, expected) in [([1.0, 1.0], "2 token shares for 3 ranks"), ([1.0, 0, 1], "share of 0.0"), ([1.0, .nan, 1], "share of nan")] {
            var o = AttentionOptions(causal: true, layout: .zigzag)
            o.shares = shares
            #expect { try AlgorithmName.ring.validate(ranks: 3, shape: s, options: o) } throws: { "\($0)".contains(expected) }
        }
        // Through a whole run: refused on every rank before the memory estimate splits the sequence by them.
        let errors = try InProcessCluster.run(ranks: 3) { comm -> String in
            var config = AttentionRunConfig(algorithm: .ring, shape: s, options: AttentionOptions(causal: true, layout: .zigzag))
            config.options.shares = [1, 1]
            do { _ = try AttentionRun.execute(config, comm: comm, backend: "test"); return "no error" } catch { return "\(error)" }
        }
        for e in errors { #expect(e.contains("2 token shares for 3 ranks"), "\(e)") }
    }

    /// Ulysses when kv heads are fewer than ranks: each rank's query heads share one kv head, sent to every rank
    /// that needs it, and its dK, dV partial sums add up at the owner (MQA at P = 4 and 8; H = 8, G = 2 at P = 4).
    @Test(arguments: [(4, 4, 1), (8, 8, 1), (4, 8, 2), (8, 8, 2)])
    func ulyssesSharedKVHeads(ranks: Int, heads: Int, kvHeads: Int) throws {
        try checkAttention(AttentionCase(algorithm: .ulysses, ranks: ranks, shape: AttentionShape(seqLen: 23, heads: heads, kvHeads: kvHeads, headDim: 16),
                                         causal: true, layout: .zigzag))
    }

    /// Ulysses refuses head counts it cannot shard, on every rank, naming the counts that work.
    @Test func ulyssesRefusesIndivisibleHeads() throws {
        for (ranks, heads, kvHeads, expected) in [(4, 6, 3, "4 ranks do not divide --heads 6"), (3, 6, 2, "straddle kv heads")] {
            let errors = try InProcessCluster.run(ranks: ranks) { comm -> String in
                var config = AttentionRunConfig(algorithm: .ulysses, shape: AttentionShape(seqLen: 12, heads: heads, kvHeads: kvHeads, headDim: 8))
                config.check = true
                do { _ = try AttentionRun.execute(config, comm: comm, backend: "test"); return "no error" } catch { return "\(error)" }
            }
            for e in errors { #expect(e.contains(expected) && e.contains("choose ring"), "\(e)") }
        }
    }

    /// Ring with more than one key tile per block (C > tileCols) and a query tile boundary.
    @Test func ringWithMultiTileBlocks() throws {
        try checkAttention(AttentionCase(algorithm: .ring, ranks: 2, shape: AttentionShape(seqLen: 2 * SoftmaxAttention.tileCols + 90, heads: 1, headDim: 16),
                                         causal: true, layout: .zigzag))
    }

    /// ring: forward sends exactly P-1 packed K/V blocks per rank and no collective; backward P-1 K/V blocks and
    /// P-1 dK/dV blocks (those of ranks r-1, ..., r-P+1: the own block's never leaves; none at P = 1).
    @Test(arguments: [1, 2, 3, 4]) func ringCommunicationPattern(ranks: Int) throws {
        let s = AttentionShape(seqLen: 26, heads: 2, kvHeads: 1, headDim: 16)
        let counters = try checkAttention(AttentionCase(algorithm: .ring, ranks: ranks, shape: s, causal: true, layout: .zigzag))
        let counts = SequenceLayout.zigzag.counts(ranks: ranks, length: 26)
        for (r, (fwd, bwd)) in counters.enumerated() {
            #expect(fwd.messagesSent == ranks - 1 && fwd.collectives == 0, "rank \(r) forward \(fwd)")
            #expect(bwd.messagesSent == 2 * (ranks - 1) && bwd.collectives == 0, "rank \(r) backward \(bwd)")
            // The blocks this rank forwards: its own, then those of ranks r-1, r-2, ... (P-1 of them).
            let forwarded = (0..<(ranks - 1)).map { counts[(r - $0 + ranks) % ranks] }.reduce(0, +)
            #expect(fwd.bytesSent == forwarded * 2 * s.kvHeads * s.headDim * 4, "rank \(r) forward bytes")
            // Backward: the same K/V blocks, and the accumulators of blocks r-1, ..., r-P+1 after adding to them.
            let accumulated = (1..<max(ranks, 1)).map { counts[(r - $0 + ranks) % ranks] }.reduce(0, +)
            #expect(bwd.bytesSent == (forwarded + accumulated) * 2 * s.kvHeads * s.headDim * 4, "rank \(r) backward bytes")
        }
    }

    /// rsa: forward circulates K, then V: 2(P-1) messages per rank (C*G*D floats each) and no collective;
    /// backward 2(P-1) K/V messages plus 2(P-1) accumulators (dV, dK; the own block's stay home).
    @Test(arguments: [1, 2, 3, 4]) func rsaCommunicationPattern(ranks: Int) throws {
        let s = AttentionShape(seqLen: 26, heads: 2, kvHeads: 1, headDim: 16)
        let counters = try checkAttention(AttentionCase(algorithm: .rsa, ranks: ranks, shape: s, causal: true, layout: .zigzag))
        let counts = SequenceLayout.zigzag.counts(ranks: ranks, length: 26)
        for (r, (fwd, bwd)) in counters.enumerated() {
            #expect(fwd.messagesSent == 2 * (ranks - 1) && fwd.collectives == 0, "rank \(r) forward \(fwd)")
            #expect(bwd.messagesSent == 4 * (ranks - 1) && bwd.collectives == 0, "rank \(r) backward \(bwd)")
            let forwarded = (0..<(ranks - 1)).map { counts[(r - $0 + ranks) % ranks] }.reduce(0, +)
            #expect(fwd.bytesSent == 2 * forwarded * s.kvHeads * s.headDim * 4, "rank \(r) forward bytes")
        }
    }

    /// Ring attention with a progress thread (and with no progress calls): same answers, same messages; the thread
    /// waits on the requests while the kernel runs, and the accumulator of the next step arrives meanwhile.
    /// Contiguous causal too: blocks a rank skips, with accumulators that pass through it untouched.
    @Test(arguments: [RingProgress.thread, .none], [2, 3, 4]) func ringProgressModes(mode: RingProgress, ranks: Int) throws {
        for layout in [SequenceLayout.zigzag, .contiguous] {
            try ringProgressMode(mode, ranks: ranks, layout: layout)
        }
    }

    func ringProgressMode(_ mode: RingProgress, ranks: Int, layout: SequenceLayout) throws {
        var c = AttentionCase(algorithm: .ring, ranks: ranks, shape: AttentionShape(seqLen: 45, heads: 4, kvHeads: 2, headDim: 16), causal: true, layout: layout)
        c.ringProgress = mode
        for (fwd, bwd) in try checkAttention(c) {
            #expect(fwd.messagesSent == ranks - 1 && bwd.messagesSent == 2 * (ranks - 1))
        }
    }

    /// rsa backward without the forward's probability rows recomputes them from lse (one more K ring).
    @Test(arguments: [1, 3]) func rsaBackwardRecomputesRows(ranks: Int) throws {
        var c = AttentionCase(algorithm: .rsa, ranks: ranks, shape: AttentionShape(seqLen: 31, heads: 2, kvHeads: 1, headDim: 16), causal: true, layout: .zigzag)
        c.dropSaved = true
        let counters = try checkAttention(c)
        for (_, bwd) in counters { #expect(bwd.messagesSent == 5 * (ranks - 1)) }
    }

    /// ulysses: one all-to-all in and one back, forward and backward; no point-to-point messages.
    @Test(arguments: [1, 2, 4]) func ulyssesCommunicationPattern(ranks: Int) throws {
        let counters = try checkAttention(AttentionCase(algorithm: .ulysses, ranks: ranks, shape: Self.gqaShape(.ulysses, ranks: ranks, seqLen: 30),
                                                        causal: true))
        for (r, (fwd, bwd)) in counters.enumerated() {
            #expect(fwd[.allToAllV] == 2 && fwd.collectives == 2 && fwd.messagesSent == 0, "rank \(r) forward \(fwd)")
            #expect(bwd[.allToAllV] == 2 && bwd.collectives == 2 && bwd.messagesSent == 0, "rank \(r) backward \(bwd)")
        }
    }

    @Test func shapesThatBite() throws {
        let cases: [AttentionCase] = [
            // L = P: one token per rank; L < P: some ranks hold nothing.
            AttentionCase(algorithm: .allgather, ranks: 4, shape: AttentionShape(seqLen: 4, heads: 2, headDim: 16), causal: true),
            AttentionCase(algorithm: .allgather, ranks: 8, shape: AttentionShape(seqLen: 5, heads: 2, headDim: 16), causal: true, layout: .zigzag),
            AttentionCase(algorithm: .allgather, ranks: 3, shape: AttentionShape(seqLen: 2, heads: 2, headDim: 16), causal: false),
            // Batch 2 and MQA; a query tile boundary (more than 128 tokens on a rank).
            AttentionCase(algorithm: .allgather, ranks: 2, shape: AttentionShape(batch: 2, seqLen: 290, heads: 3, kvHeads: 1, headDim: 16), causal: true, layout: .zigzag),
            // Large logits: inputs times 30.
            AttentionCase(algorithm: .allgather, ranks: 3, shape: AttentionShape(seqLen: 40, heads: 2, headDim: 64), causal: true, inputScale: 30),
            AttentionCase(algorithm: .ring, ranks: 4, shape: AttentionShape(seqLen: 4, heads: 2, headDim: 16), causal: true),
            AttentionCase(algorithm: .ring, ranks: 8, shape: AttentionShape(seqLen: 5, heads: 2, headDim: 16), causal: true, layout: .zigzag),
            AttentionCase(algorithm: .ring, ranks: 3, shape: AttentionShape(seqLen: 2, heads: 2, headDim: 16), causal: false),
            AttentionCase(algorithm: .ring, ranks: 2, shape: AttentionShape(batch: 2, seqLen: 290, heads: 3, kvHeads: 1, headDim: 16), causal: true, layout: .zigzag),
            AttentionCase(algorithm: .ring, ranks: 3, shape: AttentionShape(seqLen: 40, heads: 2, headDim: 64), causal: true, layout: .zigzag, inputScale: 30),
            AttentionCase(algorithm: .rsa, ranks: 4, shape: AttentionShape(seqLen: 4, heads: 2, headDim: 16), causal: true),
            AttentionCase(algorithm: .rsa, ranks: 8, shape: AttentionShape(seqLen: 5, heads: 2, headDim: 16), causal: true, layout: .zigzag),
            AttentionCase(algorithm: .rsa, ranks: 3, shape: AttentionShape(seqLen: 2, heads: 2, headDim: 16), causal: false),
            AttentionCase(algorithm: .rsa, ranks: 2, shape: AttentionShape(batch: 2, seqLen: 290, heads: 3, kvHeads: 1, headDim: 16), causal: true, layout: .zigzag),
            AttentionCase(algorithm: .rsa, ranks: 3, shape: AttentionShape(seqLen: 40, heads: 2, headDim: 64), causal: true, layout: .zigzag, inputScale: 30),
            AttentionCase(algorithm: .ulysses, ranks: 4, shape: AttentionShape(seqLen: 4, heads: 4, headDim: 16), causal: true),
            AttentionCase(algorithm: .ulysses, ranks: 8, shape: AttentionShape(seqLen: 5, heads: 8, kvHeads: 8, headDim: 16), causal: true, layout: .zigzag),
            AttentionCase(algorithm: .ulysses, ranks: 2, shape: AttentionShape(batch: 2, seqLen: 290, heads: 4, kvHeads: 2, headDim: 16), causal: true, layout: .zigzag),
            AttentionCase(algorithm: .ulysses, ranks: 3, shape: AttentionShape(seqLen: 40, heads: 3, headDim: 64), causal: true, layout: .zigzag, inputScale: 30),
            AttentionCase(algorithm: .dense, ranks: 1, shape: AttentionShape(seqLen: 40, heads: 2, headDim: 64), causal: false, inputScale: 30),
            AttentionCase(algorithm: .dense, ranks: 1, shape: AttentionShape(batch: 2, seqLen: 150, heads: 4, kvHeads: 2, headDim: 64), causal: true),
        ]
        for c in cases { try checkAttention(c, tolerance: c.inputScale > 1 ? .largeLogits : Tolerance()) }
    }

    /// allgather: two AllGatherV forward; backward two more plus two ReduceScatter; no point-to-point messages.
    @Test(arguments: [1, 3, 4]) func allgatherCommunicationPattern(ranks: Int) throws {
        let counters = try checkAttention(AttentionCase(algorithm: .allgather, ranks: ranks,
                                                        shape: AttentionShape(seqLen: 24, heads: 2, kvHeads: 1, headDim: 16), causal: true))
        for (fwd, bwd) in counters {
            #expect(fwd[.allGatherV] == 2 && fwd.collectives == 2 && fwd.messagesSent == 0)
            #expect(bwd[.allGatherV] == 2 && bwd[.reduceScatter] == 2 && bwd.collectives == 4 && bwd.messagesSent == 0)
        }
        // Each rank contributes its K and V chunk: 2 * C * G * D floats.
        let counts = SequenceLayout.contiguous.counts(ranks: ranks, length: 24)
        for (r, (fwd, _)) in counters.enumerated() { #expect(fwd.bytesSent == 2 * counts[r] * 16 * 4) }
    }

    /// The same inputs and ranks give the same bits.
    @Test func deterministic() throws {
        let s = AttentionShape(seqLen: 50, heads: 2, headDim: 16)
        func once() throws -> [Float] {
            try InProcessCluster.run(ranks: 3) { comm in
                let opts = AttentionOptions(causal: true, layout: .zigzag)
                let x = SeededInputs.attention(shape: s, options: opts, positions: opts.layout.positions(rank: comm.rank, ranks: 3, length: 50), seed: 1)
                let o = try AllGatherAttention().forward(x, comm: comm).o
                return try opts.layout.gather(o, length: 50, comm: comm).toArray()
            }[0]
        }
        let a = try once(), b = try once()
        #expect(a.map(\.bitPattern) == b.map(\.bitPattern))
    }

    /// Every distributed algorithm, forward and backward, gives the same bits on a re-run (reductions in a fixed
    /// order; ring accumulators add in step order whatever the timing).
    @Test(arguments: [AlgorithmName.allgather, .ring, .rsa, .ulysses, .lasp1, .lasp2])
    func everyAlgorithmIsDeterministic(algorithm: AlgorithmName) throws {
        let s = AttentionShape(seqLen: 45, heads: 3, kvHeads: 3, headDim: 16)
        let options = algorithm.family == .linear ? AttentionOptions(causal: true, decay: [0.9])
                                                  : AttentionOptions(causal: true, layout: .zigzag)
        func once() throws -> [[UInt32]] {
            let g = try runOnCluster(algorithm.implementation, ranks: 3, shape: s, options: options, seed: 2)[0].gathered
            return [g.o, g.dq, g.dk, g.dv].map { $0.toArray().map(\.bitPattern) }
        }
        #expect(try once() == once(), "\(algorithm) differs between runs")
    }

    /// Seeded inputs do not depend on the number of ranks or the layout.
    @Test func seededInputsIndependentOfRanks() {
        let s = AttentionShape(batch: 2, seqLen: 11, heads: 2, kvHeads: 1, headDim: 4)
        let global = SeededInputs.attention(shape: s, options: AttentionOptions(), positions: Array(0..<11), seed: 9)
        for ranks in [2, 3, 8] {
            for layout in SequenceLayout.allCases {
                for r in 0..<ranks {
                    let p = layout.positions(rank: r, ranks: ranks, length: 11)
                    let local = SeededInputs.attention(shape: s, options: AttentionOptions(layout: layout), positions: p, seed: 9)
                    #expect(local.k.toArray() == layout.scatter(global.k, rank: r, ranks: ranks).toArray())
                }
            }
        }
    }
}
