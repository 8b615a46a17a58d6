import ArgumentParser
import Foundation
import SeqPar

/// `seqpar bench documents`: a packed sequence of documents against the two ways to do without packing, in one launch:
/// the same documents padded to the longest (a batch of documents, each computed at the longest length), and each
/// document run alone (the sum of their times). Every figure's GFLOP/s counts the documents' own work, so padding's
/// waste shows as a lower rate.
struct DocumentsBenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "documents",
        abstract: "Packed documents against the same documents padded to the longest and run one by one, in one launch.",
        discussion: """
        The documents come from --doc-lens (or --cu-seqlens), or are drawn with --draw MIN,MAX: lengths uniform in \
        [MIN, MAX] (seeded by --seed) until they fill --seq-len, the last one taking what is left. \
        over_sum: a figure's time over the sum of the per-document runs' (the target for packed is within 1.1); \
        rank_balance: the slowest rank's median time over the mean rank's (packed run). \
        --rounds N measures packed, padded and separate N times in turn, so that a host whose speed drifts moves all \
        three alike: each round gives its own over_sum, and the figures are the medians over the rounds.
        """)

    @Option(help: "Algorithm (a softmax algorithm: allgather, ring, rsa, ulysses).") var algorithm: AlgorithmName = .ring
    @Option(help: "Sequence length L of the packed sequence (with --draw; else the documents' sum).") var seqLen: Int?
    @Option(help: "Query heads H.") var heads = 8
    @Option(help: "Key/value heads G (default H).") var kvHeads: Int?
    @Option(help: "Head dimension D.") var headDim = 128
    @Flag(help: "Causal mask within each document.") var causal = false
    @Option(help: "Sequence layout: contiguous or zigzag (per document).") var layout: SequenceLayout = .contiguous
    @OptionGroup var documentOptions: DocumentOptions
    @Option(help: ArgumentHelp("Draw the documents: lengths uniform in [MIN, MAX] until they fill --seq-len.", valueName: "min,max")) var draw: String?
    @Option(help: "Seed of the drawn lengths and of the inputs.") var seed: UInt64 = 0
    @Option(help: "Precision: fp32 or bf16.") var precision: Precision = .fp32
    @Option(help: "Timed repetitions (the median is reported).") var repeats = 3
    @Option(help: "Untimed repetitions first.") var warmup = 1
    @Option(help: "Rounds of packed, padded and separate in turn (over_sum per round; the medians are reported).") var rounds = 1
    @Flag(help: "Forward only.") var forwardOnly = false
    @Flag(help: "Profile one more step of each direction of the packed and separate runs: per rank, the shares of the products, the softmax passes, communication and the rest (JSON field profile_ranks).") var profile = false
    @Flag(help: "One JSON object per figure instead of the table.") var json = false
    @OptionGroup var rankOptions: RankOptions
    @OptionGroup var threadOptions: ThreadOptions

    func validate() throws {
        guard algorithm.family == .softmax, algorithm != .dense else {
            throw ValidationError("--algorithm \(algorithm): bench documents compares softmax attention across ranks (allgather, ring, rsa, ulysses)")
        }
        guard (draw != nil) != documentOptions.given else { throw ValidationError("give the documents with --doc-lens or --cu-seqlens, or draw them with --draw MIN,MAX") }
        if draw != nil && seqLen == nil { throw ValidationError("--draw needs --seq-len, the packed length to fill") }
        _ = try drawRange()
        for (name, v) in [("--heads", heads), ("--kv-heads", kvHeads ?? heads), ("--head-dim", headDim), ("--repeats", repeats), ("--rounds", rounds), ("--seq-len", seqLen ?? 1)] where v < 1 {
            throw ValidationError("\(name) \(v): must be at least 1")
        }
        guard warmup >= 0 else { throw ValidationError("--warmup \(warmup): must be 0 or more") }
    }

    func drawRange() throws -> ClosedRange<Int>? {
        guard let draw else { return nil }
        let v = draw.split(separator: ",").map { Int($0.trimmingCharacters(in: .whitespaces)) }
        guard v.count == 2, let lo = v[0], let hi = v[1], lo >= 1, lo <= hi else {
            throw ValidationError("--draw '\(draw)': give MIN,MAX, whole numbers with 1 <= MIN <= MAX (e.g. --draw 512,16384)")
        }
        return lo...hi
    }

    /// Lengths uniform in `range` from a seeded generator until they fill `length`; the last takes the rest.
    static func drawLengths(_ length: Int, _ range: ClosedRange<Int>, seed: UInt64) -> [Int] {
        let rng = CounterRandom(seed: seed, stream: 99)
        var lengths: [Int] = []
        var left = length
        while left > 0 {
            let u = rng.uniform(UInt64(lengths.count))
            let n = min(left, range.lowerBound + min(Int(u * Double(range.count)), range.count - 1))
            lengths.append(n)
            left -= n
        }
        return lengths
    }

    func documents() throws -> Documents {
        if let range = try drawRange(), let l = seqLen { return try Documents(lengths: Self.drawLengths(l, range, seed: seed), seqLen: l) }
        if let lengths = try documentOptions.lengths() { return try Documents(lengths: lengths, seqLen: seqLen ?? lengths.reduce(0, +)) }
        let offsets = try NPY.readIntegers(documentOptions.cuSeqlens!)
        return try Documents(cuSeqlens: offsets, seqLen: seqLen ?? offsets.last ?? 0, source: "--cu-seqlens \(documentOptions.cuSeqlens!)")
    }

    struct Figure: Encodable {
        var bench = "documents"
        var run: String
        var direction: String
        var algorithm: AlgorithmName
        var ranks: Int
        var documents: Int, seqLen: Int, longest: Int
        var heads: Int, kvHeads: Int, headDim: Int
        var causal: Bool
        var layout: SequenceLayout
        var precision: Precision
        var timeS: Double
        /// The documents' own FLOPs over the time.
        var gflops: Double
        var overSum: Double
        /// With --rounds: the rounds' smallest and largest over_sum (over_sum is their median).
        var overSumMin: Double?, overSumMax: Double?
        var rounds: Int
        /// Packed: the slowest rank's median over the mean rank's.
        var rankBalance: Double?
        /// `--profile`: per rank, the seconds of the profiled step and its shares (separate: summed over the documents).
        var profileRanks: [AttentionBenchResult.ProfiledStep]?
    }

    /// One round: packed (every rank's figures), padded and separate (seconds per direction), separate's profiles.
    struct Round {
        var packed: [AttentionBenchResult]
        var padded: [Double], separate: [Double]
        var separateProfiles: [[AttentionBenchResult.ProfiledStep]?]
    }

    /// Two runs' profiles added rank by rank: seconds summed, shares weighted by them.
    static func sum(_ a: [AttentionBenchResult.ProfiledStep]?, _ b: [AttentionBenchResult.ProfiledStep]?) -> [AttentionBenchResult.ProfiledStep]? {
        guard let a else { return b }
        guard let b else { return a }
        return zip(a, b).map { x, y in
            let t = x.seconds + y.seconds
            func mix(_ f: (AttentionBenchResult.ProfiledStep) -> Double) -> Double { t > 0 ? (f(x) * x.seconds + f(y) * y.seconds) / t : 0 }
            return .init(rank: x.rank, seconds: t, gemm: mix(\.gemm), softmax: mix(\.softmax), communication: mix(\.communication), other: mix(\.other))
        }
    }

    func run() throws {
        let docs = try documents()
        let (algorithm, heads, kvHeads, headDim, causal, layout, precision) = (self.algorithm, self.heads, self.kvHeads ?? self.heads, self.headDim, self.causal, self.layout, self.precision)
        let (repeats, warmup, backward, seed, profile) = (self.repeats, self.warmup, !forwardOnly, self.seed, self.profile)
        @Sendable func options(_ documents: Documents?) -> AttentionOptions {
            var o = AttentionOptions(causal: causal, layout: layout)
            (o.precision, o.documents) = (precision, documents)
            return o
        }
        let out = try Launch.run(ranks: rankOptions.ranks, timeout: rankOptions.timeout, threads: threadOptions.threads) { comm, backend in
            func measure(_ shape: AttentionShape, _ documents: Documents?) throws -> [AttentionBenchResult] {
                try AttentionBench.measure(algorithm, shape: shape, options: options(documents), comm: comm, ranksPerHost: backend.ranksPerHost,
                                           repeats: repeats, warmup: warmup, backward: backward, seed: seed, probe: false,
                                           profile: !profile ? .none : backend.name == "mpi" ? .allRanks : .rankZero)
            }
            var rounds: [Round] = []
            for _ in 0..<self.rounds {
                let packed = try measure(AttentionShape(seqLen: docs.seqLen, heads: heads, kvHeads: kvHeads, headDim: headDim), docs)
                let padded = try measure(AttentionShape(batch: docs.count, seqLen: docs.lengths.max()!, heads: heads, kvHeads: kvHeads, headDim: headDim), nil)
                var separate = [Double](repeating: 0, count: packed.count)
                var separateProfiles = [[AttentionBenchResult.ProfiledStep]?](repeating: nil, count: packed.count)
                for n in docs.lengths {
                    for (i, r) in try measure(AttentionShape(seqLen: n, heads: heads, kvHeads: kvHeads, headDim: headDim), nil).enumerated() {
                        separate[i] += r.timeS
                        separateProfiles[i] = Self.sum(separateProfiles[i], r.profileRanks)
                    }
                }
                rounds.append(Round(packed: packed, padded: padded.map(\.timeS), separate: separate, separateProfiles: separateProfiles))
            }
            return (rounds, backend)
        }
        guard let (rounds, backend) = out else { return }
        let flops = AttentionRun.attentionFlops(AttentionShape(seqLen: docs.seqLen, heads: heads, kvHeads: kvHeads, headDim: headDim), causal: causal, documents: docs)
        var figures: [Figure] = []
        let last = rounds.last!
        for (i, p) in last.packed.enumerated() {
            let stepFlops = p.direction == "forward" ? flops : flops * AttentionRun.backwardFlopsFactor(.softmax)
            let runs: [(String, (Round) -> Double, Double?, [AttentionBenchResult.ProfiledStep]?)] = [
                ("packed", { $0.packed[i].timeS }, KernelBench.median(rounds.map { $0.packed[i].rankTimeMaxS / $0.packed[i].rankTimeAvgS }), p.profileRanks),
                ("padded", { $0.padded[i] }, nil, nil), ("separate", { $0.separate[i] }, nil, last.separateProfiles[i])]
            for (name, time, balance, profiled) in runs {
                // Per round, the time over that round's separate runs; the medians over the rounds.
                let overSums = rounds.map { time($0) / $0.separate[i] }
                let t = KernelBench.median(rounds.map(time))
                figures.append(Figure(run: name, direction: p.direction, algorithm: algorithm, ranks: backend.ranks, documents: docs.count, seqLen: docs.seqLen,
                                      longest: docs.lengths.max()!, heads: heads, kvHeads: kvHeads, headDim: headDim, causal: causal, layout: layout,
                                      precision: precision, timeS: t, gflops: stepFlops / t / 1e9, overSum: KernelBench.median(overSums),
                                      overSumMin: rounds.count > 1 ? overSums.min() : nil, overSumMax: rounds.count > 1 ? overSums.max() : nil,
                                      rounds: rounds.count, rankBalance: balance, profileRanks: profiled))
            }
        }
        if json { figures.forEach { print(Report.json($0)) }; return }
        let columns = [("run", 10), ("direction", 10), ("time_s", 10), ("GFLOP/s", 9), ("over_sum", 9), ("over_sum_range", 15), ("rank_balance", 13)]
        (Provenance.header("bench documents") + [
            "# \(backend.ranks) rank(s), backend \(backend.name); \(algorithm.rawValue), \(causal ? "causal" : "full"), layout \(layout.rawValue), H=\(heads) G=\(kvHeads) D=\(headDim), \(precision.rawValue); median of \(repeats) after \(warmup) warm-up, slowest rank\(rounds.count > 1 ? "; \(rounds.count) rounds of packed, padded, separate in turn, medians over them" : "")",
            "# \(docs) in L=\(docs.seqLen), longest \(docs.lengths.max()!)",
            "# packed: one sequence with the document mask; padded: a batch of \(docs.count) documents each at length \(docs.lengths.max()!); separate: each document alone, times summed",
            "# GFLOP/s: the documents' own work over the time; over_sum: time over separate's; rank_balance: slowest rank's median over the mean's",
            columns.map { Report.pad($0.0, $0.1) }.joined(),
        ]).forEach { print($0) }
        for f in figures {
            let range = f.overSumMin.flatMap { lo in f.overSumMax.map { String(format: "%.2f-%.2f", lo, $0) } } ?? "-"
            let cells = [f.run, f.direction, String(format: "%.4f", f.timeS), String(format: "%.1f", f.gflops), String(format: "%.2f", f.overSum), range,
                         f.rankBalance.map { String(format: "%.2f", $0) } ?? "-"]
            print(zip(cells, columns).map { Report.pad($0, $1.1) }.joined())
        }
    }
}
