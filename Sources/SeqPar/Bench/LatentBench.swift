// Decode-step benchmark for latent attention: one step (T query tokens, 1 for decoding) of TP-MLA or TPLA against a
// cache of L tokens, each rank's shard built once (not timed). A step is this rank's attention plus the combining
// collective (TP-MLA's AllGather, TPLA's all-reduce), from a barrier until the slowest rank is done; median over
// repetitions after warm-up. Bytes read per step per rank are the latent cache the rank holds (latent and RoPE
// columns): the whole cache for TP-MLA, 1/P of the latent columns plus the RoPE keys for TPLA. That ratio is where
// TPLA's speed-up comes from, when the step is bound by reading the cache.
// --precision bf16: the cache is packed bf16 (half the bytes per rank, read at the same step: the other speed-up) and
// the queries are rounded for the kernel's bf16 path; scores, softmax, outputs and the combine stay fp32.

public struct LatentBenchResult: Codable, Sendable {
    public var bench = "latent"
    public var algorithm: LatentAlgorithm
    public var direction = "forward"
    public var ranks: Int
    public var seqLen: Int, queries: Int, heads: Int, latentDim: Int, ropeDim: Int, vDim: Int
    public var transform: LatentTransform
    public var precision: Precision
    /// Median step (slowest rank), min and max over repetitions; the attention part alone (slowest rank, median).
    public var timeS: Double, timeMinS: Double, timeMaxS: Double, attendS: Double
    /// Cache bytes each rank reads per step (the most over ranks), and the rate it reads them at in the attention part.
    public var cacheBytesPerRank: Int
    public var cacheGBps: Double
    public var bytesSent: Int
    public var peakRSSBytes: Int
    public var repeats: Int, warmup: Int
}

public enum LatentBench {
    public static func measure(_ algorithm: LatentAlgorithm, shape s: LatentShape, transform: LatentTransform, precision: Precision = .fp32,
                               comm: some Communicator, ranksPerHost: Int = 1, repeats: Int, warmup: Int, seed: UInt64 = 0) throws -> LatentBenchResult {
        let (rank, ranks) = (comm.rank, comm.size)
        var failure: Error?
        do {
            try s.validate()
            try algorithm.validate(ranks: ranks, shape: s)
            if transform == .hadamard { _ = try transform.matrix(latentDim: s.latentDim) }
            if precision == .bf16 { try OneDNN.require() }
            let f = MemoryLayout<Float>.size
            let need = 3 * (s.seqLen * (s.latentDim + s.ropeDim) + s.heads * s.latentDim * s.vDim) * f
            if let available = SystemInfo.availableMemory(), need * ranksPerHost > available {
                throw SeqParError.outOfMemory("the latent benchmark needs about \(SystemInfo.bytesText(need)) per rank x \(ranksPerHost) rank(s) here, and this machine has \(SystemInfo.bytesText(available)) available: use a shorter --seq-len")
            }
        } catch { failure = error }
        try comm.agree(failure)
        let x = LatentInputs.seeded(s, seed: seed)
        let r = try transform.matrix(latentDim: s.latentDim, cache: x.latent, slices: algorithm == .tpla ? ranks : 1)
        let shard = LatentShard.make(algorithm, x, transform: r, rank: rank, ranks: ranks, precision: precision)
        let scale = s.defaultScale
        var steps: [Double] = [], attends: [Double] = []
        var sent = 0
        for i in 0..<(warmup + repeats) {
            try comm.barrier()
            comm.resetCounters()
            let t = SystemInfo.now()
            let mine = shard.attend(vDim: s.vDim, scale: scale)
            let ta = SystemInfo.now() - t
            _ = try LatentParallel.combine(algorithm, mine, shape: s, comm: comm)
            let step = SystemInfo.now() - t
            if i == warmup { sent = comm.counters.bytesSent }
            let slowest = try comm.allReduce([step, ta], op: .max)
            if i >= warmup { steps.append(slowest[0]); attends.append(slowest[1]) }
        }
        let maxima = try comm.allReduce([shard.cacheBytes, sent, SystemInfo.peakRSS()], op: .max)
        let attend = KernelBench.median(attends)
        return LatentBenchResult(algorithm: algorithm, ranks: ranks, seqLen: s.seqLen, queries: s.queries, heads: s.heads,
                                 latentDim: s.latentDim, ropeDim: s.ropeDim, vDim: s.vDim, transform: transform, precision: precision,
                                 timeS: KernelBench.median(steps), timeMinS: steps.min()!, timeMaxS: steps.max()!, attendS: attend,
                                 cacheBytesPerRank: maxima[0], cacheGBps: Double(maxima[0]) / attend / 1e9, bytesSent: maxima[1],
                                 peakRSSBytes: maxima[2], repeats: repeats, warmup: warmup)
    }
}
