// Kernel benchmark: the blockwise softmax kernel's forward and backward GFLOP/s on one rank, next to OpenBLAS sgemm
// measured in the same process with the same threads, so the ratio holds on a noisy shared machine.
//
// FLOPs: forward 4 B H L^2 D (two products of L x L x D), half when causal; backward 2.5 times the forward (five
// products instead of two), the FlashAttention convention. The sgemm baseline is a square n x n x n product (2 n^3
// FLOPs), the rate BLAS reaches on a well-shaped problem: the ceiling a kernel built from BLAS tiles aims at.
// Every figure is the median of `repeats` timed runs after `warmup` untimed ones.

public struct KernelBenchResult: Codable, Sendable {
    public var bench = "kernel"
    public var kernel: String
    public var direction: String
    public var ranks = 1
    public var batch: Int, seqLen: Int, heads: Int, kvHeads: Int, headDim: Int
    public var causal: Bool
    /// Median, min and max seconds per call.
    public var timeS: Double, timeMinS: Double, timeMaxS: Double
    public var gflops: Double
    public var sgemmGflops: Double
    /// gflops / sgemm_gflops.
    public var ratio: Double
    public var blasThreads: Int
    public var repeats: Int
}

public enum KernelBench {
    public struct Timing: Sendable { public var median: Double, min: Double, max: Double }

    /// Times `body`: `warmup` untimed calls, then `repeats` timed ones.
    public static func time(repeats: Int, warmup: Int, _ body: () -> Void) -> Timing {
        for _ in 0..<warmup { body() }
        var times: [Double] = []
        for _ in 0..<max(repeats, 1) {
            let t = SystemInfo.now()
            body()
            times.append(SystemInfo.now() - t)
        }
        return Timing(median: median(times), min: times.min()!, max: times.max()!)
    }

    /// The median of `values` (the mean of the middle two for an even count).
    static func median(_ values: [Double]) -> Double {
        let s = values.sorted()
        return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
    }

    /// OpenBLAS sgemm GFLOP/s on an n x n x n product.
    public static func sgemmGflops(n: Int = 2048, repeats: Int = 3, warmup: Int = 1) -> Double {
        let a = SeededInputs.tensor(.q, seed: 1, batch: 1, length: n, heads: 1, dim: n, positions: Array(0..<n))
        let b = SeededInputs.tensor(.k, seed: 1, batch: 1, length: n, heads: 1, dim: n, positions: Array(0..<n))
        let c = Tensor(zeros: [n, n])
        let t = time(repeats: repeats, warmup: warmup) {
            BLAS.gemm(a.head(0), b.head(0), into: Matrix(base: c.pointer, rows: n, cols: n))
        }
        return 2 * Double(n) * Double(n) * Double(n) / t.median / 1e9
    }

    /// Forward and backward of the blockwise kernel on one generated (B, L, H, D) problem.
    public static func softmax(shape s: AttentionShape, causal: Bool, sgemmGflops: Double, repeats: Int, warmup: Int,
                               backward: Bool = true) -> [KernelBenchResult] {
        let options = AttentionOptions(causal: causal)
        let all = Array(0..<s.seqLen)
        let x = SeededInputs.attention(shape: s, options: options, positions: all, seed: 3)
        let dO = SeededInputs.gradOut(shape: s, positions: all, seed: 3)
        let flops = AttentionRun.attentionFlops(s, causal: causal)
        func result(_ direction: String, _ t: Timing, _ f: Double) -> KernelBenchResult {
            KernelBenchResult(kernel: "blockwise_softmax", direction: direction, batch: s.batch, seqLen: s.seqLen, heads: s.heads,
                              kvHeads: s.kvHeads, headDim: s.headDim, causal: causal, timeS: t.median, timeMinS: t.min, timeMaxS: t.max,
                              gflops: f / t.median / 1e9, sgemmGflops: sgemmGflops, ratio: f / t.median / 1e9 / sgemmGflops,
                              blasThreads: BLAS.threads, repeats: repeats)
        }
        var output: AttentionOutput!
        let forward = time(repeats: repeats, warmup: warmup) {
            output = SoftmaxAttention.forward(q: x.q, qPositions: all, k: x.k, v: x.v, kPositions: all, causal: causal, scale: x.scale)
        }
        var results = [result("forward", forward, flops)]
        if backward {
            let t = time(repeats: repeats, warmup: warmup) {
                _ = SoftmaxAttention.backward(q: x.q, qPositions: all, k: x.k, v: x.v, kPositions: all, output: output,
                                              gradOut: dO, causal: causal, scale: x.scale)
            }
            results.append(result("backward", t, 2.5 * flops))
        }
        return results
    }
}
