// Attention step benchmark: one algorithm's forward (and backward) step time across the ranks of a job, on seeded
// inputs generated once. Each repetition starts at a barrier and lasts until the slowest rank is done (every rank's
// time is gathered and the maximum taken): the time a training step would wait. Warm-up runs are excluded; the
// figure is the median over repetitions, with the min and max beside it, and the spread over ranks.
//
// FLOPs are `AttentionRun.attentionFlops` (softmax: 4 B H L^2 D, half when causal, summed over the documents of a
// packed sequence; linear: the chunk form's work),
// backward `backwardFlopsFactor` times that; tokens/s is L*B over the step time. Bytes are one step's payload per
// rank (the most any rank sent). Memory is refused before allocating, as in `seqpar attention`.
// Precision: a bf16 figure (`options.precision`) needs oneDNN on every rank (checked and agreed first) and rounds its
// inputs to bf16, as a bf16 run does; the FLOPs counted are the same.

public struct AttentionBenchResult: Codable, Sendable {
    public var bench = "attention"
    public var algorithm: AlgorithmName
    public var direction: String
    public var ranks: Int
    public var batch: Int, seqLen: Int, heads: Int, kvHeads: Int, headDim: Int
    public var causal: Bool
    public var layout: SequenceLayout
    /// fp32 or bf16 (the algorithm's and its baseline's).
    public var precision: Precision = .fp32
    /// How the tokens were split: equally, or by the ranks' speeds (`SpeedBalance`); with speed, each rank's tokens
    /// and the probe's rate per rank (GFLOP/s) that set them.
    public var balance: SpeedBalance.Mode = .equal
    public var rankTokens: [Int]?, balanceRates: [Double]?
    public var decay: [Double]?
    public var featureMap: FeatureMap?
    /// The number of packed documents (nil: one); FLOPs then count the documents' work, not L^2.
    public var documents: Int?
    /// USP: the Ulysses degree U (a grid of U x ranks/U).
    public var ulyssesDegree: Int?
    /// Median over repetitions of the slowest rank's time; min and max over repetitions.
    public var timeS: Double, timeMinS: Double, timeMaxS: Double
    /// Each rank's median time: fastest, mean and slowest rank.
    public var rankTimeMinS: Double, rankTimeAvgS: Double, rankTimeMaxS: Double
    public var tokensPerS: Double
    public var gflops: Double
    /// Seconds per step a rank stood blocked in communication (its waits and collectives): the most and the least over
    /// ranks; and inside progress tests between tiles, the most. The least is about the exchange left exposed, the
    /// most adds the waiting of fast ranks for slow ones.
    public var waitS: Double?, waitMinS: Double?, progressS: Double?
    /// Payload one step sends, the most over ranks, and received.
    public var bytesSent: Int, bytesReceived: Int
    public var messages: Int, collectives: Int
    /// Peak resident memory, the most over ranks (the whole process so far: inputs, earlier runs included).
    public var peakRSSBytes: Int
    public var repeats: Int, warmup: Int
    /// Scaling efficiency: this step's GFLOP/s over `ranks` times the single-rank baseline's (dense for softmax, the
    /// chunkwise kernel on one rank for linear), measured in the same launch; nil where no baseline ran. At the same L
    /// this is T_1 / (P T_P).
    public var efficiency: Double?
    public var baselineSeqLen: Int?, baselineTimeS: Double?, baselineGflops: Double?
    /// True when the baseline ran on every rank at once (`AttentionBench.baseline`'s `everyRank`).
    public var baselineBusy: Bool?
    /// Ring attention's communication overlap (`RingOverlap`, the standard progress mode), where measured.
    public var overlap: Double?
    /// `KernelBench.sgemmProbe` just before the first timed step and just after the last, on every rank at once (the
    /// slowest rank's): the mean, and the two.
    public var probeSgemmGflops: Double?, probeSgemmBeforeGflops: Double?, probeSgemmAfterGflops: Double?
    /// `--profile`: one more step after the timed ones, profiled (`KernelProfile`), per rank: its seconds and the
    /// shares of them in the products, in the softmax row passes, blocked on communication (or testing it), and the
    /// rest. Every rank under MPI; rank 0 only in process (one profiled thread per process).
    public var profileRanks: [ProfiledStep]?

    public struct ProfiledStep: Codable, Sendable {
        public var rank: Int
        public var seconds: Double
        public var gemm: Double, softmax: Double, communication: Double, other: Double
        public init(rank: Int, seconds: Double, gemm: Double, softmax: Double, communication: Double, other: Double) {
            (self.rank, self.seconds, self.gemm, self.softmax, self.communication, self.other) = (rank, seconds, gemm, softmax, communication, other)
        }
    }
}

/// The single-rank baseline of a scaling figure, per direction.
public struct AttentionBaseline: Sendable {
    public var seqLen: Int
    public var busy = false
    public var forwardS: Double, backwardS: Double?
    public var forwardGflops: Double, backwardGflops: Double?
}

public enum AttentionBench {
    /// The single-rank baseline at `shape`: dense (softmax) or LASP-2 on one rank (the chunkwise linear kernel), run
    /// by rank 0 alone on a one-rank communicator while the others wait; nil on every rank when it would not fit in
    /// rank 0's share of memory. With `everyRank`, every rank runs its own copy at once and the slowest one's time
    /// counts: the one-rank rate with the host's cores all busy, so an efficiency against it leaves out the contention
    /// for memory bandwidth and clock that any work on every core meets. Every rank returns the same figures.
    public static func baseline(shape: AttentionShape, options: AttentionOptions, family: AlgorithmName.Family, comm: some Communicator,
                                ranksPerHost: Int = 1, repeats: Int, warmup: Int, backward: Bool = true,
                                everyRank: Bool = false) throws -> AttentionBaseline? {
        let algorithm: AlgorithmName = family == .softmax ? .dense : .lasp2
        var config = AttentionRunConfig(algorithm: algorithm, shape: shape, options: options)
        config.backward = backward
        let need = MemoryEstimate.attention(config, ranks: 1, rank: 0).total
        let fits = SystemInfo.availableMemory().map { need * ranksPerHost <= $0 } ?? true
        let runsHere = everyRank ? try comm.allReduce([fits ? 1.0 : 0], op: .min)[0] == 1 : comm.rank == 0 && fits
        var times = [-1.0, -1.0]  // -1: not measured
        if runsHere {
            let solo = InProcessCluster(size: 1).makeCommunicators()[0]
            let r = try measure(algorithm, shape: shape, options: options, comm: solo, repeats: repeats, warmup: warmup, backward: backward, probe: false)
            times = [r[0].timeS, r.count > 1 ? r[1].timeS : -1]
        }
        times = try comm.allReduce(times, op: .max)
        guard times[0] > 0 else { return nil }
        let flops = AttentionRun.attentionFlops(shape, causal: options.causal, documents: options.documents, family: family)
        let b = times[1] > 0 ? times[1] : nil
        return AttentionBaseline(seqLen: shape.seqLen, busy: everyRank, forwardS: times[0], backwardS: b, forwardGflops: flops / times[0] / 1e9,
                                 backwardGflops: b.map { flops * AttentionRun.backwardFlopsFactor(family) / $0 / 1e9 })
    }

    /// Each rank's host and the CPUs it may run on, in rank order.
    public static func placement(comm: some Communicator) throws -> [(host: String, cpus: String)] {
        try comm.allGatherStrings(SystemInfo.hostName + " " + SystemInfo.cpuList(SystemInfo.allowedCPUs())).map {
            let parts = $0.split(separator: " ", maxSplits: 1).map(String.init)
            return (parts[0], parts.count > 1 ? parts[1] : "")
        }
    }

    /// Fills `efficiency` from `baseline` and `overlap` from ring overlap results, matching directions.
    public static func annotate(_ results: [AttentionBenchResult], baseline: AttentionBaseline?, overlap: [OverlapResult]) -> [AttentionBenchResult] {
        results.map { r in
            var r = r
            if let b = baseline, let g = r.direction == "forward" ? b.forwardGflops : b.backwardGflops {
                r.efficiency = r.gflops / (Double(r.ranks) * g)
                r.baselineSeqLen = b.seqLen
                r.baselineTimeS = r.direction == "forward" ? b.forwardS : b.backwardS
                r.baselineGflops = g
                r.baselineBusy = b.busy
            }
            // The overlap bench runs the equal split: its figure belongs to that row only.
            if r.algorithm == .ring, r.balance == .equal, let o = overlap.first(where: { $0.direction == r.direction }) { r.overlap = o.overlap }
            return r
        }
    }

    /// Times `algorithm` on this rank's part of a seeded problem; every rank returns the same results (forward, then
    /// backward unless `backward` is false). With `probe`, the host's speed is taken before and after the timed steps.
    /// With `balance` .speed, the tokens are split by the ranks' speeds measured just before (`SpeedBalance`).
    /// Which ranks `measure` profiles (`KernelProfile` counts one thread per process).
    public enum ProfileRanks: Sendable { case none, rankZero, allRanks }

    public static func measure(_ algorithm: AlgorithmName, shape: AttentionShape, options: AttentionOptions, comm: some Communicator,
                               ranksPerHost: Int = 1, repeats: Int, warmup: Int, backward: Bool = true, seed: UInt64 = 0,
                               probe: Bool = true, balance: SpeedBalance.Mode = .equal, profile: ProfileRanks = .none) throws -> [AttentionBenchResult] {
        let (rank, ranks) = (comm.rank, comm.size)
        var options = options
        var failure: Error?
        do {
            try shape.validate()
            try algorithm.validate(ranks: ranks, shape: shape, options: options)
            if options.precision == .bf16 { try OneDNN.require() }
        } catch { failure = error }
        try comm.agree(failure)
        let rates = balance == .speed ? try SpeedBalance.rates(family: algorithm.family, shape: shape, precision: options.precision, comm: comm) : nil
        if let rates { options.shares = SpeedBalance.shares(rates) }
        var config = AttentionRunConfig(algorithm: algorithm, shape: shape, options: options)
        config.backward = backward
        do {
            if rates != nil { try algorithm.validate(ranks: ranks, shape: shape, options: options) }  // the probed shares
            let estimate = MemoryEstimate.attention(config, ranks: ranks, rank: rank)
            if let available = SystemInfo.availableMemory(), estimate.total * ranksPerHost > available {
                throw SeqParError.outOfMemory(AttentionRun.outOfMemoryMessage(config, estimate: estimate, ranks: ranks, ranksPerHost: ranksPerHost, available: available))
            }
        } catch { failure = error }
        try comm.agree(failure)

        let positions = options.partition.positions(rank: rank, ranks: ranks, length: shape.seqLen)
        let x = SeededInputs.attention(shape: shape, options: options, positions: positions, seed: seed)
        let dO = SeededInputs.gradOut(shape: shape, positions: positions, seed: seed)
        if options.precision == .bf16 { for t in [x.q, x.k, x.v, dO] { t.roundToBF16() } }
        let implementation = algorithm.implementation

        /// Runs `step` warmup + repeats times from a barrier; returns this rank's times, one step's counters, and its
        /// seconds blocked on communication and in progress per timed step (medians, as the times).
        /// `before` runs untimed ahead of each step (the forward drops the previous step's output there, so two
        /// outputs, with RSA's kept score rows, never live at once).
        func timeSteps(before: () -> Void = {}, _ step: () throws -> Void) throws -> (times: [Double], counters: CommCounters, wait: Double, progress: Double) {
            var times: [Double] = []
            var counters = CommCounters()
            var (waits, progress): ([Double], [Double]) = ([], [])
            for i in 0..<(warmup + repeats) {
                before()
                try comm.barrier()
                comm.resetCounters()
                let t = SystemInfo.now()
                try step()
                let elapsed = SystemInfo.now() - t
                let c = comm.counters
                if i == warmup { counters = c }
                if i >= warmup { times.append(elapsed); waits.append(c.waitSeconds); progress.append(c.progressSeconds) }
            }
            return (times, counters, KernelBench.median(waits), KernelBench.median(progress))
        }

        /// One more `step`, profiled on this rank where `profile` says so: [seconds, gemm, softmax, communication] seconds.
        func profiled(_ step: () throws -> Void) throws -> [Double]? {
            guard profile != .none else { return nil }
            try comm.barrier()
            comm.resetCounters()
            guard profile == .allRanks || rank == 0 else { try step(); return nil }
            var failure: Error?
            let p = KernelProfile.measure { do { try step() } catch { failure = error } }
            if let failure { throw failure }
            let c = comm.counters
            return [p.seconds, p.gemmSeconds, p.softmaxSeconds, c.waitSeconds + c.progressSeconds]
        }

        let probeBefore = try probe ? KernelBench.sgemmProbe(comm: comm) : nil
        var output: AttentionOutput?
        let forward = try timeSteps(before: { output = nil }) { output = try implementation.forward(x, comm: comm) }
        var profiles = [try profiled { output = try implementation.forward(x, comm: comm) }]
        var runs = [("forward", forward)]
        if backward, let out = output {
            runs.append(("backward", try timeSteps { _ = try implementation.backward(x, output: out, gradOut: dO, comm: comm) }))
            profiles.append(try profiled { _ = try implementation.backward(x, output: out, gradOut: dO, comm: comm) })
        }
        let probeAfter = try probe ? KernelBench.sgemmProbe(comm: comm) : nil
        let rss = try comm.allReduce([SystemInfo.peakRSS()], op: .max)[0]
        let family = algorithm.family
        let flops = AttentionRun.attentionFlops(shape, causal: options.causal, documents: options.documents, family: family)
        return try zip(runs, profiles).map { runAndName, mine in
            let (direction, run) = runAndName
            let profileRanks: [AttentionBenchResult.ProfiledStep]? = profile == .none ? nil : try comm.allGather(mine ?? [0, 0, 0, 0]).enumerated().compactMap { r, p in
                guard p[0] > 0 else { return nil }
                let (gemm, softmax, wait) = (min(p[1] / p[0], 1), min(p[2] / p[0], 1), min(p[3] / p[0], 1))
                return .init(rank: r, seconds: p[0], gemm: gemm, softmax: softmax, communication: wait, other: max(0, 1 - gemm - softmax - wait))
            }
            // Slowest rank per repetition, and each rank's median.
            let all = try comm.allGather(run.times)
            let slowest = (0..<repeats).map { i in all.map { $0[i] }.max()! }
            let perRank = all.map(KernelBench.median)
            let t = KernelBench.median(slowest)
            let c = run.counters
            let traffic = try comm.allReduce([c.bytesSent, c.bytesReceived, c.messagesSent, c.collectives], op: .max)
            let waits = try comm.allGather([run.wait, run.progress])
            let stepFlops = direction == "forward" ? flops : flops * AttentionRun.backwardFlopsFactor(family)
            return AttentionBenchResult(
                algorithm: algorithm, direction: direction, ranks: ranks, batch: shape.batch, seqLen: shape.seqLen, heads: shape.heads,
                kvHeads: shape.kvHeads, headDim: shape.headDim, causal: options.causal, layout: options.layout, precision: options.precision,
                balance: balance, rankTokens: rates == nil ? nil : options.partition.counts(ranks: ranks, length: shape.seqLen), balanceRates: rates,
                decay: family == .linear ? options.decayPerHead(shape.heads).map(Double.init) : nil,
                featureMap: family == .linear ? options.featureMap : nil, documents: options.documents?.count, ulyssesDegree: options.ulyssesDegree,
                timeS: t, timeMinS: slowest.min()!, timeMaxS: slowest.max()!,
                rankTimeMinS: perRank.min()!, rankTimeAvgS: perRank.reduce(0, +) / Double(ranks), rankTimeMaxS: perRank.max()!,
                tokensPerS: Double(shape.batch * shape.seqLen) / t, gflops: stepFlops / t / 1e9,
                waitS: waits.map { $0[0] }.max()!, waitMinS: waits.map { $0[0] }.min()!, progressS: waits.map { $0[1] }.max()!,
                bytesSent: traffic[0], bytesReceived: traffic[1], messages: traffic[2], collectives: traffic[3],
                peakRSSBytes: rss, repeats: repeats, warmup: warmup,
                probeSgemmGflops: probeBefore.flatMap { b in probeAfter.map { (b + $0) / 2 } }, probeSgemmBeforeGflops: probeBefore,
                probeSgemmAfterGflops: probeAfter, profileRanks: profileRanks)
        }
    }
}
