// Latent attention in bf16: MLA, TP-MLA and TPLA over a packed bf16 cache against their Double definitions
// (LatentOracle) on bf16-rounded inputs, within 2e-2 and with a bf16-sized error (so a bf16 run that silently ran
// fp32 fails); the cache each rank holds is half the fp32 cache's bytes; the decode handoff sends half the bytes,
// places every row, and decodes within 2e-2 of MLA; LatentRun, DecodeRun and the latent benchmark in bf16.
import Testing
@testable import SeqPar

@Suite(.enabled(if: OneDNN.isAvailable, "oneDNN (libdnnl) is not installed")) struct BF16LatentTests {
    struct Run: @unchecked Sendable { var o: Tensor; var cacheBytes: Int; var counters: CommCounters }

    static let shape = LatentShape(seqLen: 301, queries: 3, heads: 8, latentDim: 64, ropeDim: 16, vDim: 32)

    /// Seeded inputs with the cache and the queries rounded to bf16 (W_UV, a weight of the fp32 up-projection, is not).
    static func inputs(seed: UInt64, outliers: Int = 0) -> LatentInputs {
        let x = LatentInputs.seeded(shape, seed: seed, outliers: outliers)
        for t in [x.latent, x.ropeK, x.qLatent, x.qRope] { t.roundToBF16() }
        return x
    }

    static func run(_ algorithm: LatentAlgorithm, ranks: Int, _ x: LatentInputs, transform r: Tensor?, precision: Precision) throws -> [Run] {
        let s = x.shape
        return try InProcessCluster.run(ranks: ranks) { comm -> Run in
            let shard = LatentShard.make(algorithm, x, transform: r, rank: comm.rank, ranks: comm.size, precision: precision)
            comm.resetCounters()
            let o = try LatentParallel.combine(algorithm, shard.attend(vDim: s.vDim, scale: s.defaultScale), shape: s, comm: comm)
            return Run(o: o, cacheBytes: shard.cacheBytes, counters: comm.counters)
        }
    }

    /// Every algorithm at 1, 2 and 4 ranks, with and without the Hadamard transform: within 2e-2 of its own Double
    /// definition, bf16-sized, every rank's cache half the fp32 one, and the combine still one fp32 collective.
    @Test(arguments: [LatentTransform.none, .hadamard])
    func matchesTheDefinitions(transform: LatentTransform) throws {
        try OneDNN.require()
        let x = Self.inputs(seed: 1, outliers: transform == .none ? 0 : 4)
        let scale = Double(Self.shape.defaultScale)
        let r = try transform.matrix(latentDim: Self.shape.latentDim)
        let mla = LatentOracle.tpla(x, transform: nil, slices: 1, scale: scale)
        for (algorithm, ranks) in [(LatentAlgorithm.mla, 1), (.tpMLA, 2), (.tpMLA, 4), (.tpla, 1), (.tpla, 2), (.tpla, 4)] {
            let expected = algorithm == .tpla ? LatentOracle.tpla(x, transform: r, slices: ranks, scale: scale) : mla
            let bf16 = try Self.run(algorithm, ranks: ranks, x, transform: r, precision: .bf16)
            let fp32 = try Self.run(algorithm, ranks: ranks, x, transform: r, precision: .fp32)
            let label = "\(algorithm) P=\(ranks) \(transform)"
            let error = relativeError(bf16[0].o, expected), fp32Error = relativeError(fp32[0].o, expected)
            #expect(error <= 2e-2, "\(label): bf16 error \(error)")
            #expect(error > 1e-5, "\(label): bf16 error \(error) is not bf16-sized (fp32 gives \(fp32Error))")
            #expect(fp32Error <= 2e-5, "\(label): fp32 on the rounded inputs \(fp32Error)")
            print("bf16 \(label): error \(String(format: "%.2e", error)) (fp32 on the same inputs \(String(format: "%.2e", fp32Error)))")
            for (b, f) in zip(bf16, fp32) {
                #expect(b.o.buffer.elementsEqual(bf16[0].o.buffer), "\(label): every rank holds the same output")
                #expect(2 * b.cacheBytes == f.cacheBytes, "\(label): bf16 cache \(b.cacheBytes) B, fp32 \(f.cacheBytes) B")
                #expect(b.counters.bytesSent == f.counters.bytesSent && b.counters.collectives == f.counters.collectives,
                        "\(label): the combine stays fp32")
            }
        }
    }

    /// A bf16 cache stores exactly the rounded values, and a view of rows shares them.
    @Test func cacheStoresRoundedValues() {
        let t = Tensor(shape: [3, 5], values: (0..<15).map { Float($0) * 1.001 + 0.3 })
        let c = LatentCache(t, precision: .bf16)
        #expect(c.bytes == 15 * 2 && LatentCache(t, precision: .fp32).bytes == 15 * 4)
        #expect(c.toTensor().toArray() == t.toArray().map(BF16.rounded))
        let v: [Float] = [7.77, -1.234]
        c.rows(1..<3).write(row: 1, column: 2, v, count: 2)
        #expect(c.toTensor()[2, 2] == BF16.rounded(7.77) && c.toTensor()[2, 3] == BF16.rounded(-1.234))
    }

    /// LatentRun in bf16: the check against the Double definition on rounded inputs passes at 2e-2, the report says
    /// bf16, and each rank's cache is half the fp32 run's.
    @Test func latentRunChecksInBF16() throws {
        try OneDNN.require()
        var reports: [Precision: LatentRunReport] = [:]
        for precision in Precision.allCases {
            var config = LatentRunConfig(algorithm: .tpla, shape: Self.shape)
            (config.precision, config.check, config.transform) = (precision, true, .hadamard)
            let c = config
            reports[precision] = try InProcessCluster.run(ranks: 2) { try LatentRun.execute(c, comm: $0, backend: "test") }[0]
        }
        let (b, f) = (reports[.bf16]!, reports[.fp32]!)
        #expect(b.precision == .bf16 && b.check?.passed == true && b.check?.tolerance == 2e-2 && (b.check?.error ?? 0) > 1e-5, "\(String(describing: b.check))")
        #expect(zip(b.cacheBytes, f.cacheBytes).allSatisfy { 2 * $0 == $1 }, "\(b.cacheBytes) vs \(f.cacheBytes)")
    }

    /// The handoff in bf16: every row lands at its global position on the right rank as the bf16 rounding of its value,
    /// and the collective carries half the fp32 bytes.
    @Test(arguments: [2, 3], [LatentAlgorithm.tpla, .tpMLA])
    func handoffSendsHalfTheBytes(ranks: Int, algorithm: LatentAlgorithm) throws {
        var caches: [Precision: [Tensor]] = [:], sent: [Precision: [Int]] = [:]
        var c = DecodeTests.config(algorithm)
        let w = MLAWeights(c)
        let all = Array(0..<c.promptLength)
        let global = Projected(SeededInputs.hidden(.hidden, seed: c.seed, batch: 1, length: c.promptLength, width: c.modelDim, positions: all),
                               positions: all, weights: w, config: c)
        for precision in Precision.allCases {
            c.precision = precision
            let config = c
            let out = try InProcessCluster.run(ranks: ranks) { comm -> (Tensor, Int, Int) in
                let positions = config.layout.positions(rank: comm.rank, ranks: comm.size, length: config.promptLength)
                let x = SeededInputs.hidden(.hidden, seed: config.seed, batch: 1, length: config.promptLength, width: config.modelDim, positions: positions)
                let p = Projected(x, positions: positions, weights: w, config: config)
                comm.resetCounters()
                let cache = try DecodeRun.handoff(p, transform: nil, config: config, comm: comm)
                return (cache.toTensor(), comm.counters.bytesSent, cache.bytes)
            }
            (caches[precision], sent[precision]) = (out.map(\.0), out.map(\.1))
            #expect(out.allSatisfy { $0.2 == $0.0.count * precision.operandBytes }, "cache bytes in \(precision)")
        }
        #expect(zip(sent[.bf16]!, sent[.fp32]!).allSatisfy { 2 * $0 == $1 && $0 > 0 }, "bytes sent: bf16 \(sent[.bf16]!), fp32 \(sent[.fp32]!)")
        for (rank, cache) in caches[.bf16]!.enumerated() {
            let cols = LatentShard.split(algorithm, heads: c.heads, latentDim: c.latentDim, rank: rank, ranks: ranks).cols
            let width = cols.count + c.ropeDim
            var mismatches = 0
            for row in 0..<c.promptLength {
                for j in 0..<cols.count where cache.pointer[row * width + j] != BF16.rounded(global.c.pointer[row * c.latentDim + cols.lowerBound + j]) { mismatches += 1 }
                for j in 0..<c.ropeDim where cache.pointer[row * width + cols.count + j] != BF16.rounded(global.kr.pointer[row * c.ropeDim + j]) { mismatches += 1 }
            }
            #expect(mismatches == 0, "\(algorithm) P=\(ranks) rank \(rank): \(mismatches) cache elements are not their rounded values")
            #expect(cache.buffer[(c.promptLength * width)...].allSatisfy { $0 == 0 }, "rows for the decode steps start empty")
        }
    }

    /// DecodeRun in bf16: prefill (ring attention's bf16 kernel) and decode pass their 2e-2 checks with bf16-sized
    /// errors; the handoff's bytes and each rank's cache halve; a step's all-reduce stays the fp32 (H, d_v) output.
    @Test(arguments: [(LatentAlgorithm.tpla, 2), (.tpMLA, 2), (.tpla, 1)])
    func decodeInBF16(algorithm: LatentAlgorithm, ranks: Int) throws {
        try OneDNN.require()
        var reports: [Precision: DecodeReport] = [:]
        for precision in Precision.allCases {
            var config = DecodeTests.config(algorithm)
            config.precision = precision
            let c = config
            reports[precision] = try InProcessCluster.run(ranks: ranks) { try DecodeRun.execute(c, comm: $0, backend: "test") }[0]
        }
        let (b, f) = (reports[.bf16]!, reports[.fp32]!)
        let label = "\(algorithm) P=\(ranks)"
        #expect(b.passed == true && b.prefillError! <= 2e-2 && b.prefillError! > 1e-5, "\(label): prefill \(b.prefillError!)")
        if algorithm != .tpla || ranks == 1 {
            #expect(b.differenceFromMLA <= 2e-2 && b.differenceFromMLA > 1e-5, "\(label): decode vs MLA \(b.differenceFromMLA)")
        }
        #expect(zip(b.cacheBytes, f.cacheBytes).allSatisfy { 2 * $0 == $1 }, "\(label): cache \(b.cacheBytes) vs \(f.cacheBytes)")
        #expect(zip(b.handoffBytesSent, f.handoffBytesSent).allSatisfy { 2 * $0 == $1 && ($0 > 0 || ranks == 1) }, "\(label): handoff \(b.handoffBytesSent) vs \(f.handoffBytesSent)")
        #expect(b.stepBytesSent == f.stepBytesSent && b.stepCollectives == f.stepCollectives, "\(label): the step's collective stays fp32")
        print("bf16 decode \(label): prefill \(String(format: "%.2e", b.prefillError!)), decode vs MLA \(String(format: "%.2e", b.differenceFromMLA)) (fp32: \(String(format: "%.2e", f.differenceFromMLA))); handoff bytes \(b.handoffBytesSent) vs \(f.handoffBytesSent)")
    }

    /// `bench latent --precision bf16`: each rank reads half the cache bytes.
    @Test func benchReadsHalfTheBytes() throws {
        try OneDNN.require()
        let s = LatentShape(seqLen: 256, heads: 4, latentDim: 64, ropeDim: 16, vDim: 16)
        let results = try Precision.allCases.map { precision in
            try InProcessCluster.run(ranks: 2) { try LatentBench.measure(.tpla, shape: s, transform: .none, precision: precision, comm: $0, repeats: 2, warmup: 1) }[0]
        }
        #expect(results[1].precision == .bf16 && 2 * results[1].cacheBytesPerRank == results[0].cacheBytesPerRank && results[0].cacheBytesPerRank == 256 * 48 * 4,
                "\(results.map(\.cacheBytesPerRank))")
    }
}
