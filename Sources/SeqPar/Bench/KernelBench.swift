// Kernel benchmark: the blockwise softmax kernel's forward and backward GFLOP/s on one rank, next to OpenBLAS sgemm
// measured in the same process with the same threads, so the ratio holds on a noisy shared machine. In bf16 the
// baseline is oneDNN's bf16 matmul (bf16 in, fp32 out) on the same square product: the ceiling of the matrix units.
//
// FLOPs: forward 4 B H L^2 D (two products of L x L x D), half when causal; backward 2.5 times the forward (five
// products instead of two), the FlashAttention convention. The sgemm baseline is a square n x n x n product (2 n^3
// FLOPs), the rate BLAS reaches on a well-shaped problem: the ceiling a kernel built from BLAS tiles aims at.
// The linear kernel is the chunkwise causal linear attention of one rank (LASP-2 on one rank: the masked intra-block
// products and the running state, `AttentionRun.attentionFlops` for its FLOPs), forward and backward.
// Every figure is the median of `repeats` timed runs after `warmup` untimed ones. One more, profiled, run splits the
// time into sgemm, exponentials and the rest (`KernelProfile`).
// The baseline is also timed in turns with the kernel (`baselineSize`): one product of the square, one kernel call,
// and so on, each ratio taken within its turn, so that a host whose speed drifts by 2x within a minute (the shared
// device) moves both sides of it together; the ratio is the median of the turns'.

public struct KernelBenchResult: Codable, Sendable {
    public var bench = "kernel"
    public var kernel: String
    public var direction: String
    /// Ranks that ran the kernel at the same time (each its own problem, one per core under mpirun): the rate a
    /// rank gets with its host's other cores busy. Time is the slowest rank's median.
    public var ranks = 1
    public var batch: Int, seqLen: Int, heads: Int, kvHeads: Int, headDim: Int
    public var causal: Bool
    /// Median, min and max seconds per call.
    public var timeS: Double, timeMinS: Double, timeMaxS: Double
    public var gflops: Double
    public var sgemmGflops: Double
    /// fp32 or bf16.
    public var precision: Precision = .fp32
    /// oneDNN's bf16 matmul GFLOP/s on the same square product (bf16 runs).
    public var bf16MatmulGflops: Double?
    /// gflops over the baseline of its precision: the median over turns of the kernel's rate over the baseline's
    /// timed just before it (`turnBaselineGflops`); without turns, over sgemm_gflops (fp32) or bf16_matmul_gflops (bf16).
    public var ratio: Double
    /// The baseline of the row's precision (sgemm or oneDNN's bf16 matmul, `baselineSize`^3) timed in turns with the
    /// kernel's calls: the median of its rates (nil where the benchmark ran no turns).
    public var turnBaselineGflops: Double?
    public var blasThreads: Int
    public var repeats: Int
    /// Shares of the profiled run's time: inside the products (sgemm or oneDNN's matmul; measured), in the softmax
    /// kernels' row passes over the score tiles (measured; 0 for the linear kernel), and the rest; they add up to 1.
    /// `expFraction` is the exponentials' part (count x cost per element, an estimate) of the softmax share;
    /// `maxFraction` the bf16 forward's row maxima (measured: the profiled call sweeps them apart; 0 elsewhere).
    public var gemmFraction: Double, softmaxFraction: Double, expFraction: Double, maxFraction: Double, otherFraction: Double
    /// Linear kernel only: the decay per head.
    public var decay: Float?
    /// The fastest and slowest rank's GFLOP/s.
    public var rankGflopsMin: Double, rankGflopsMax: Double
    /// Every rank's GFLOP/s (its median), by rank: on a shared host some cores can run at half the others' rate, and
    /// an algorithm in lockstep runs at its slowest rank's (a rankfile can leave such cores out).
    public var rankGflops: [Double]
    /// `KernelBench.sgemmProbe` in this process, before the kernels ran.
    public var probeSgemmGflops: Double?
}

/// The kernels `seqpar bench kernel` times.
public enum BenchKernel: String, CaseIterable, Codable, Sendable {
    /// The blockwise softmax kernel (SoftmaxAttention).
    case softmax
    /// Chunkwise causal linear attention (LinearAttention through LASP-2 on one rank).
    case linear

    /// The name in figures and JSON.
    public var name: String { self == .softmax ? "blockwise_softmax" : "chunkwise_linear" }
}

public enum KernelBench {
    public struct Timing: Sendable { public var median: Double, min: Double, max: Double }

    /// Times `body`: `warmup` untimed calls, then `repeats` timed ones.
    public static func time(repeats: Int, warmup: Int, _ body: () -> Void) -> Timing {
        let times = withoutActuallyEscaping(body) { timeInTurns(repeats: repeats, warmup: warmup, [$0])[0] }
        return Timing(median: median(times), min: times.min()!, max: times.max()!)
    }

    /// Times each of `bodies` in turns: `warmup` untimed rounds, then `repeats` timed ones, each round one call of
    /// every body in order. Seconds per call, by body then round.
    public static func timeInTurns(repeats: Int, warmup: Int, _ bodies: [() -> Void]) -> [[Double]] {
        for _ in 0..<warmup { bodies.forEach { $0() } }
        var times = [[Double]](repeating: [], count: bodies.count)
        for _ in 0..<max(repeats, 1) {
            for (i, body) in bodies.enumerated() {
                let t = SystemInfo.now()
                body()
                times[i].append(SystemInfo.now() - t)
            }
        }
        return times
    }

    /// One product of the square baseline of `precision`, side `n` (sgemm, or oneDNN's bf16 matmul), ready to time
    /// in turns with a kernel: the call and its FLOPs.
    static func baselineProduct(_ precision: Precision, n: Int) throws -> (call: () -> Void, flops: Double) {
        let a = SeededInputs.tensor(.q, seed: 1, batch: 1, length: n, heads: 1, dim: n, positions: Array(0..<n))
        let b = SeededInputs.tensor(.k, seed: 1, batch: 1, length: n, heads: 1, dim: n, positions: Array(0..<n))
        let c = Tensor(zeros: [n, n])
        let flops = 2 * Double(n) * Double(n) * Double(n)
        guard precision == .bf16 else { return ({ BLAS.gemm(a.head(0), b.head(0), into: Matrix(base: c.pointer, rows: n, cols: n)) }, flops) }
        let dnn = try OneDNN.context()
        let (a16, b16) = (BF16Tensor(rounding: a), BF16Tensor(rounding: b))
        return ({
            dnn.gemm(BF16Matrix(base: a16.pointer, rows: n, cols: n), BF16Matrix(base: b16.pointer, rows: n, cols: n), into: Matrix(base: c.pointer, rows: n, cols: n))
        }, flops)
    }

    /// The median of `values` (the mean of the middle two for an even count).
    public static func median(_ values: [Double]) -> Double {
        let s = values.sorted()
        return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
    }

    /// OpenBLAS sgemm GFLOP/s on an n x n x n product.
    public static func sgemmGflops(n: Int = 2048, repeats: Int = 3, warmup: Int = 1) -> Double {
        let product = try! baselineProduct(.fp32, n: n)  // fp32 needs no oneDNN: it cannot throw
        return product.flops / time(repeats: repeats, warmup: warmup, product.call).median / 1e9
    }

    /// oneDNN bf16 matmul GFLOP/s on an n x n x n product (bf16 operands, fp32 result): the bf16 kernel's ceiling.
    public static func bf16MatmulGflops(n: Int = 2048, repeats: Int = 3, warmup: Int = 1) throws -> Double {
        let product = try baselineProduct(.bf16, n: n)
        return product.flops / time(repeats: repeats, warmup: warmup, product.call).median / 1e9
    }

    /// The machine's speed now: sgemm GFLOP/s on a `probeSize`^3 product, every rank of `comm` at once from a barrier,
    /// the slowest rank's median of three after one warm-up (about 0.1 s). `bench kernel` and `bench attention` both
    /// record it (`probe_sgemm_gflops`): the state of a shared host when a figure was taken. (Scaling the cost model's
    /// rates by it did not bring its predictions closer on the device: the kernels' rates drift apart from sgemm's.)
    public static let probeSize = 1024
    public static func sgemmProbe(comm: some Communicator) throws -> Double {
        try comm.barrier()
        return try comm.allReduce([sgemmGflops(n: probeSize, repeats: 3, warmup: 1)], op: .min)[0]
    }

    /// Forward and backward of `kernel` on one generated (B, L, H, D) problem; softmax uses `causal`, linear is
    /// causal with `decay`.
    /// Every rank of `comm` runs the same measurement at once (starting at a barrier); the figures are the slowest rank's.
    /// `precision` bf16 rounds the inputs to bf16 and runs the kernel's bf16 path (`bf16MatmulGflops` is then the baseline).
    public static func measure(_ kernel: BenchKernel, shape s: AttentionShape, causal: Bool, decay: Float = 1, sgemmGflops: Double,
                               precision: Precision = .fp32, bf16MatmulGflops: Double? = nil,
                               repeats: Int, warmup: Int, backward: Bool = true, comm: some Communicator, profileInTurns: Bool = false,
                               baselineSize: Int? = nil) throws -> [KernelBenchResult] {
        let family: AlgorithmName.Family = kernel == .softmax ? .softmax : .linear
        var options = kernel == .softmax ? AttentionOptions(causal: causal) : AttentionOptions(causal: true, decay: [Double(decay)])
        options.precision = precision
        let all = Array(0..<s.seqLen)
        let x = SeededInputs.attention(shape: s, options: options, positions: all, seed: 3)
        let dO = SeededInputs.gradOut(shape: s, positions: all, seed: 3)
        if precision == .bf16 { for t in [x.q, x.k, x.v, dO] { t.roundToBF16() } }
        let baseline = precision == .bf16 ? (bf16MatmulGflops ?? sgemmGflops) : sgemmGflops
        let flops = AttentionRun.attentionFlops(s, causal: options.causal, family: family)
        let expCost = KernelProfile.expSecondsPerElement(rowLength: SoftmaxAttention.tileCols, precision: precision)
        let solo = InProcessCluster(size: 1).makeCommunicators()[0]
        // The baseline timed in turns with the kernel (one product, one kernel call, ...): see the file comment.
        let turnBaseline = try baselineSize.map { try baselineProduct(precision, n: $0) }
        let implementation = (kernel == .softmax ? AlgorithmName.dense : AlgorithmName.lasp2).implementation

        func result(_ direction: String, _ f: Double, _ body: @escaping () throws -> Void) throws -> KernelBenchResult {
            var failure: Error?
            let call = { do { try body() } catch { failure = error } }
            try comm.barrier()
            let turns = timeInTurns(repeats: repeats, warmup: warmup, (turnBaseline.map { [$0.call] } ?? []) + [call])
            let kernelTimes = turns.last!
            let mine = Timing(median: median(kernelTimes), min: kernelTimes.min()!, max: kernelTimes.max()!)
            // Per turn: the kernel's rate over the baseline's just before it; the median of those, and of the baseline's rates.
            let turnRatio = turnBaseline.map { b in median(zip(turns[0], kernelTimes).map { (f / $1) / (b.flops / $0) }) }
            let turnRate = turnBaseline.map { b in median(turns[0].map { b.flops / $0 / 1e9 }) }
            // One profiled call at a time per process: simulated ranks (threads of one process) take turns.
            var p = (seconds: 1.0, gemmSeconds: 0.0, softmaxSeconds: 0.0, maxSeconds: 0.0, expElements: 0, scoreElements: 0)
            for turn in 0..<(profileInTurns ? comm.size : 1) {
                if profileInTurns { try comm.barrier() }
                if !profileInTurns || turn == comm.rank { p = KernelProfile.measure(call) }
            }
            if profileInTurns { try comm.barrier() }
            if let failure { throw failure }
            // The slowest rank's median (min and max with it), and the profile's shares averaged over ranks.
            let rankMedians = try comm.allGather([mine.median]).map { $0[0] }
            let slowest = rankMedians.indices.max { rankMedians[$0] < rankMedians[$1] }!
            let spread = try comm.allGather([mine.median, mine.min, mine.max, turnRatio ?? 0, turnRate ?? 0])[slowest]
            let t = Timing(median: spread[0], min: spread[1], max: spread[2])
            let shares = try comm.allReduce([Double(p.expElements) * expCost / p.seconds, p.gemmSeconds / p.seconds, p.softmaxSeconds / p.seconds, p.maxSeconds / p.seconds],
                                            op: .sum).map { $0 / Double(comm.size) }
            // The products' and the softmax passes' times are measured, the exponentials' estimated (count x cost):
            // the estimate yields, to the share it is part of.
            let gemmShare = min(shares[1], 1)
            let softmaxShare = min(shares[2], 1 - gemmShare)
            let expShare = min(shares[0], kernel == .softmax ? softmaxShare : 1 - gemmShare - softmaxShare)
            let maxShare = min(shares[3], softmaxShare)
            return KernelBenchResult(kernel: kernel.name, direction: direction, ranks: comm.size, batch: s.batch, seqLen: s.seqLen, heads: s.heads,
                                     kvHeads: s.kvHeads, headDim: s.headDim, causal: options.causal, timeS: t.median, timeMinS: t.min, timeMaxS: t.max,
                                     gflops: f / t.median / 1e9, sgemmGflops: sgemmGflops, precision: precision,
                                     bf16MatmulGflops: bf16MatmulGflops, ratio: turnBaseline == nil ? f / t.median / 1e9 / baseline : spread[3],
                                     turnBaselineGflops: turnBaseline == nil ? nil : spread[4],
                                     blasThreads: BLAS.threads, repeats: repeats, gemmFraction: gemmShare, softmaxFraction: softmaxShare,
                                     expFraction: expShare, maxFraction: maxShare, otherFraction: 1 - gemmShare - softmaxShare, decay: kernel == .linear ? decay : nil,
                                     rankGflopsMin: f / rankMedians.max()! / 1e9, rankGflopsMax: f / rankMedians.min()! / 1e9,
                                     rankGflops: rankMedians.map { f / $0 / 1e9 })
        }
        var output: AttentionOutput!
        if kernel == .softmax && precision == .bf16 {
            // The bf16 kernel on bf16 operands, heads contiguous, as a bf16 run hands them to it (the ring converts q
            // and dO once per pass; K and V arrive in bf16) and as PyTorch's bf16 attention takes its tensors: the
            // rounding of fp32 inputs is not the kernel's work. Outputs are allocated in the timed call.
            try OneDNN.require()
            let (q, k, v, dO16) = (BF16Tensor(roundingHeadMajor: x.q), BF16Tensor(roundingHeadMajor: x.k), BF16Tensor(roundingHeadMajor: x.v),
                                   BF16Tensor(roundingHeadMajor: dO))
            let windows = SoftmaxAttention.windows(all, all, causal: options.causal, documents: nil)
            var results = [try result("forward", flops) {
                output = AttentionOutput(o: Tensor(zeros: x.q.shape), lse: Tensor(zeros: [s.batch, s.heads, s.seqLen]))
                SoftmaxAttention.forwardBF16(q: .heads(q), k: .heads(k), v: .heads(v), windows: windows, scale: x.scale, into: output, progress: {})
            }]
            if backward {
                results.append(try result("backward", flops * AttentionRun.backwardFlopsFactor(family)) {
                    let grads = AttentionGradients(dq: Tensor(zeros: x.q.shape), dk: Tensor(zeros: x.k.shape), dv: Tensor(zeros: x.v.shape))
                    SoftmaxAttention.backwardBF16(q: .heads(q), k: .heads(k), v: .heads(v), windows: windows, output: output, gradOut: dO,
                                                  gradOutBF16: .heads(dO16), scale: x.scale, adding: grads, work: 0..<1, progress: {})
                })
            }
            return results
        }
        var results = [try result("forward", flops) { output = try implementation.forward(x, comm: solo) }]
        if backward {
            results.append(try result("backward", flops * AttentionRun.backwardFlopsFactor(family)) {
                _ = try implementation.backward(x, output: output, gradOut: dO, comm: solo)
            })
        }
        return results
    }
}
