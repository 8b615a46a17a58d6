// How much of ring attention's communication hides behind its compute, measured on the real code paths:
//
//   t_comm     the ring exchanges alone (`Ring.circulate` with an empty body: the same messages, nothing computed)
//   t_compute  the compute alone: every block's kernel call and merge (forward) or kernel call and gradient sums
//              (backward), on blocks fetched beforehand, no communication in flight
//   t_fused    RingAttention's forward (or backward) itself, exchanges posted before the compute, once per progress
//              mode (`RingProgress`): none (the message moves at the wait: OpenMPI's shared-memory transport moves a
//              large message only inside MPI calls), tests between tiles, a progress thread
//   overlap    (t_comm + t_compute - t_fused) / min(t_comm, t_compute): 1 when the shorter one hides entirely, 0 when
//              they run one after the other; `overlap` is the standard mode's (what a run would use), and every
//              mode's is in `overlap_by_progress`
// In bf16 (`options.precision`) the inputs are rounded to bf16 and the exchanges carry bf16 K/V blocks (half the
// bytes) with fp32 dK/dV accumulators, as a bf16 run's do.
// Each time is the slowest rank's (ranks start together after a barrier). The variants run interleaved, one of each
// per round in a rotating order, so drift in the machine's speed touches them alike; times are medians over `repeats`
// rounds after `warmup`, and the overlap is the median of each round's overlap.

public struct OverlapResult: Codable, Sendable {
    public var bench = "overlap"
    public var algorithm = "ring"
    public var direction: String
    public var ranks: Int
    public var seqLen: Int, heads: Int, kvHeads: Int, headDim: Int
    public var causal: Bool
    public var layout: SequenceLayout
    /// fp32, or bf16 (K/V blocks sent as bf16: half the bytes).
    public var precision: Precision = .fp32
    /// Bytes of one K/V block (the message of one ring step).
    public var blockBytes: Int
    public var tCommS: Double, tComputeS: Double
    /// The standard progress mode, its fused time and overlap.
    public var progress: RingProgress
    public var tFusedS: Double, overlap: Double
    public var tFusedByProgress: [String: Double], overlapByProgress: [String: Double]
    public var repeats: Int

    public static func overlap(comm: Double, compute: Double, fused: Double) -> Double {
        (comm + compute - fused) / max(min(comm, compute), 1e-12)
    }
}

public enum RingOverlap {
    /// Times every variant once per round (rotating the order), the slowest rank's time each; per variant, the
    /// times of the rounds after `warmup`.
    static func interleaved(_ comm: some Communicator, repeats: Int, warmup: Int,
                            _ variants: [(name: String, body: () throws -> Void)]) throws -> [String: [Double]] {
        var times: [String: [Double]] = [:]
        for round in 0..<(warmup + repeats) {
            for i in 0..<variants.count {
                let v = variants[(i + round) % variants.count]
                try comm.barrier()
                let t = SystemInfo.now()
                try v.body()
                let slowest = try comm.allReduce([SystemInfo.now() - t], op: .max)[0]
                if round >= warmup { times[v.name, default: []].append(slowest) }
            }
        }
        return times
    }

    public static func measure(shape: AttentionShape, options: AttentionOptions, comm: some Communicator,
                               repeats: Int, warmup: Int, backward: Bool = true,
                               modes: [RingProgress] = RingProgress.allCases) throws -> [OverlapResult] {
        let (rank, ranks) = (comm.rank, comm.size)
        let layout = options.partition, length = shape.seqLen
        let positions = layout.positions(rank: rank, ranks: ranks, length: length)
        let x = SeededInputs.attention(shape: shape, options: options, positions: positions, seed: 5)
        let dO = SeededInputs.gradOut(shape: shape, positions: positions, seed: 5)
        if options.precision == .bf16 {
            // oneDNN on every rank, agreed (a rank without it names the package; none is left waiting).
            var failure: Error?
            do { try OneDNN.require() } catch { failure = error }
            try comm.agree(failure)
            for t in [x.q, x.k, x.v, dO] { t.roundToBF16() }
        }
        let tokens = options.partition.counts(ranks: ranks, length: shape.seqLen)
        let packedShape = { (r: Int) in [RingAttention.packedCount(x, tokens: tokens[r])] }
        /// The ring's exchanges alone, with the block a run of this precision sends (bf16: half the bytes).
        func circulateOnly(accumulate: Bool) throws {
            switch options.precision {
            case .fp32:
                try Ring.circulate(RingAttention.pack(x.k, x.v), shape: packedShape, tag: RingAttention.kvTag, accumulate: accumulate, comm: comm) { _, _, _, _ in }
            case .bf16:
                try Ring.circulate(RingAttention.packBF16(x.k, x.v), shape: packedShape, tag: RingAttention.kvTag, accumulate: accumulate, comm: comm) { _, _, _, _ in }
            }
        }
        /// The compute-only runs pack the own block as a run does (the received blocks are fetched beforehand, in fp32).
        func pack() {
            if options.precision == .bf16 { _ = RingAttention.packBF16(x.k, x.v) } else { _ = RingAttention.pack(x.k, x.v) }
        }
        // Every rank's packed block, fetched once, for the compute-only runs.
        let counts = (0..<ranks).map { packedShape($0)[0] }
        let all = Tensor(zeros: [counts.reduce(0, +)])
        let own = RingAttention.pack(x.k, x.v)
        try withExtendedLifetime(own) { try comm.allGatherV(UnsafeBufferPointer(own.buffer), into: all.buffer, counts: counts) }
        let offsets = counts.reduce(into: [0]) { $0.append($0.last! + $1) }
        let blocks = (0..<ranks).map { r -> (k: Tensor, v: Tensor, keys: [Int]) in
            let keys = layout.positions(rank: r, ranks: ranks, length: length)
            let (k, v) = RingAttention.unpack(all.rows(offsets[r]..<offsets[r + 1]), x, tokens: keys.count)
            return (k.copy(), v.copy(), keys)
        }
        let order = (0..<ranks).map { (rank - $0 + ranks) % ranks }
        let output = try RingAttention().forward(x, comm: comm)

        func result(_ direction: String, _ times: [String: [Double]]) -> OverlapResult {
            let (tc, tk) = (times["comm"]!, times["compute"]!)
            var fused: [String: Double] = [:], overlaps: [String: Double] = [:]
            for mode in modes {
                let tf = times[mode.rawValue]!
                fused[mode.rawValue] = KernelBench.median(tf)
                overlaps[mode.rawValue] = KernelBench.median(tf.indices.map { OverlapResult.overlap(comm: tc[$0], compute: tk[$0], fused: tf[$0]) })
            }
            let standard = (modes.contains(.standard) ? RingProgress.standard : modes[0]).rawValue
            return OverlapResult(direction: direction, ranks: ranks, seqLen: length, heads: shape.heads, kvHeads: shape.kvHeads, headDim: shape.headDim,
                                 causal: options.causal, layout: options.layout, precision: options.precision, blockBytes: (counts.max() ?? 0) * options.precision.operandBytes,
                                 tCommS: KernelBench.median(tc), tComputeS: KernelBench.median(tk), progress: RingProgress(rawValue: standard)!, tFusedS: fused[standard]!, overlap: overlaps[standard]!,
                                 tFusedByProgress: fused, overlapByProgress: overlaps, repeats: repeats)
        }

        let forward: [(name: String, body: () throws -> Void)] = [
            ("comm", { try circulateOnly(accumulate: false) }),
            ("compute", {
                pack()
                let acc = AttentionOutput(o: Tensor(zeros: x.q.shape), lse: Tensor(zeros: [shape.batch, shape.heads, x.tokens]))
                acc.lse.fill(-.infinity)
                for source in order where !RingAttention.skips(x, keys: blocks[source].keys) {
                    let b = blocks[source]
                    LSEMerge.merge(into: acc, SoftmaxAttention.forward(q: x.q, qPositions: x.positions, k: b.k, v: b.v, kPositions: b.keys,
                                                                       causal: options.causal, scale: x.scale, precision: options.precision))
                }
            }),
        ] + modes.map { mode in (mode.rawValue, { _ = try RingAttention(progress: mode).forward(x, comm: comm) }) }
        var results = [result("forward", try interleaved(comm, repeats: repeats, warmup: warmup, forward))]
        guard backward else { return results }

        let backwardVariants: [(name: String, body: () throws -> Void)] = [
            ("comm", { try circulateOnly(accumulate: true) }),
            ("compute", {
                pack()
                let dq = Tensor(zeros: x.q.shape)
                let home = Tensor(zeros: [counts[rank]]), other = Tensor(zeros: [counts.max() ?? 0])
                // RingAttention's order: the first share of the own block, the other blocks, the rest of the own block.
                let own = RingAttention.ownShares(ranks: ranks)
                let work = [(rank, own.first)] + order.dropFirst().map { ($0, 0.0..<1) } + (own.last.map { [(rank, $0)] } ?? [])
                for (source, share) in work where !RingAttention.skips(x, keys: blocks[source].keys) {
                    let b = blocks[source]
                    let sums = source == rank ? home : other.rows(0..<counts[source])
                    if source != rank { sums.fill(0) }
                    let (dk, dv) = RingAttention.unpack(sums, x, tokens: b.keys.count)
                    SoftmaxAttention.backward(q: x.q, qPositions: x.positions, k: b.k, v: b.v, kPositions: b.keys, output: output, gradOut: dO,
                                              causal: options.causal, scale: x.scale, precision: options.precision, adding: AttentionGradients(dq: dq, dk: dk, dv: dv), work: share)
                }
            }),
        ] + modes.map { mode in (mode.rawValue, { _ = try RingAttention(progress: mode).backward(x, output: output, gradOut: dO, comm: comm) }) }
        results.append(result("backward", try interleaved(comm, repeats: repeats, warmup: warmup, backwardVariants)))
        return results
    }
}
