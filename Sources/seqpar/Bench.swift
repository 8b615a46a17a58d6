import ArgumentParser
import Foundation
import SeqPar
import SeqParMPI

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Benchmarks that print their figures next to a baseline measured in the same run.",
        subcommands: [KernelBenchCommand.self, CommBenchCommand.self, OverlapBenchCommand.self, AttentionBenchCommand.self, DocumentsBenchCommand.self, LatentBenchCommand.self])
}

/// `#` lines that say where and how a benchmark ran.
enum Provenance {
    /// The commit: $SEQPAR_COMMIT, else the one the binary was built from (Plugins/BuildInfo), else `git rev-parse` in
    /// the working directory.
    static var commit: String {
        if let c = ProcessInfo.processInfo.environment["SEQPAR_COMMIT"], !c.isEmpty { return c }
        if BuildInfo.commit != "unknown" { return BuildInfo.commit }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = ["git", "rev-parse", "--short", "HEAD"]
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = FileHandle.nullDevice
        guard (try? p.run()) != nil else { return "unknown" }
        p.waitUntilExit()
        let out = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        return p.terminationStatus == 0 && !out.isEmpty ? out : "unknown"
    }

    /// Where the ranks ran: hosts with their rank counts, and each rank's CPUs (or "none" when every rank may use
    /// every CPU of its host).
    static func placementLines(_ placement: [(host: String, cpus: String)]) -> [String] {
        var hosts: [String: Int] = [:]
        for p in placement { hosts[p.host, default: 0] += 1 }
        let all = SystemInfo.cpuList(Array(0..<SystemInfo.onlineCPUs))
        let bound = placement.contains { $0.cpus != all }
        return ["# hosts \(hosts.count): " + hosts.sorted { $0.key < $1.key }.map { "\($0.key) (\($0.value) rank(s))" }.joined(separator: ", "),
                "# binding: " + (bound ? placement.enumerated().map { "\($0.offset):\($0.element.cpus)" }.joined(separator: " ") : "none (every rank may run on every cpu)")]
    }

    static func header(_ title: String) -> [String] {
        ["# seqpar \(title)",
         "# host \(SystemInfo.hostName), \(SystemInfo.onlineCPUs) cpus online, cpus allowed \(SystemInfo.cpuList(SystemInfo.allowedCPUs()))",
         "# blas OpenBLAS core \(BLAS.coreName), \(BLAS.threads) thread(s); commit \(commit)"]
    }
}

struct KernelBenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kernel",
        abstract: "Kernel GFLOP/s on one rank (blockwise softmax, chunkwise linear), over the baseline of its precision measured in the same run (OpenBLAS sgemm, oneDNN's bf16 matmul), with the shares of time in the products, the softmax passes and the rest.",
        discussion: """
        Under mpirun -np P (or --ranks P) every rank runs the same figures at once, as the ranks of a job would share \
        the host's cores and memory; the time is the slowest rank's. The linear kernel is causal with --decay.
        """)

    enum Mask: String, ExpressibleByArgument, CaseIterable { case both, causal, full }

    @Option(parsing: .upToNextOption, help: "Kernels: softmax, linear.") var kernel: [BenchKernel] = [.softmax]
    @Option(parsing: .upToNextOption, help: "Sequence lengths.") var seqLen: [Int] = [4096, 16384]
    @Option(parsing: .upToNextOption, help: "Head dimensions.") var headDim: [Int] = [64, 128]
    @Option(help: "Query heads (and kv heads).") var heads = 1
    @Option(help: "Masks to run for the softmax kernel: both, causal or full.") var mask: Mask = .both
    @Option(help: "Decay of the linear kernel, in (0, 1].") var decay: Float = 0.99
    @Option(help: "Timed runs per figure (the median is reported).") var repeats = 3
    @Option(help: "Untimed runs before timing.") var warmup = 1
    @Option(help: "Threads for the kernel (BLAS threads in fp32, the bf16 kernels' threads in bf16) and the sgemm baseline.") var threads = 1
    @Option(help: "Side of the square sgemm baseline.") var sgemmSize = 2048
    @Option(parsing: .upToNextOption, help: "Precisions: fp32 (baseline OpenBLAS sgemm), bf16 (baseline oneDNN's bf16 matmul), or both.")
    var precision: [Precision] = [.fp32]
    @Flag(help: "Forward only.") var forwardOnly = false
    @Flag(help: "One JSON object per figure instead of the table.") var json = false
    @OptionGroup var rankOptions: RankOptions

    func validate() throws {
        for (name, values) in [("--seq-len", seqLen), ("--head-dim", headDim)] {
            guard !values.isEmpty, values.allSatisfy({ $0 >= 1 }) else { throw ValidationError("\(name): give one or more sizes, each at least 1") }
        }
        for (name, v) in [("--heads", heads), ("--repeats", repeats), ("--threads", threads), ("--sgemm-size", sgemmSize)] where v < 1 {
            throw ValidationError("\(name) \(v): must be at least 1")
        }
        guard warmup >= 0 else { throw ValidationError("--warmup \(warmup): must be 0 or more") }
        guard !kernel.isEmpty else { throw ValidationError("--kernel: name at least one of softmax, linear") }
        guard !precision.isEmpty else { throw ValidationError("--precision: name fp32, bf16 or both") }
        guard decay > 0, decay <= 1 else { throw ValidationError("--decay \(decay): must be in (0, 1]") }
    }

    func run() throws {
        let masks: [Bool] = mask == .both ? [false, true] : [mask == .causal]
        let figures = kernel.flatMap { k in headDim.flatMap { d in seqLen.flatMap { l in (k == .softmax ? masks : [true]).flatMap { m in precision.map { (k, d, l, m, $0) } } } } }
        let (heads, threads, sgemmSize, repeats, warmup, decay, backward) = (self.heads, self.threads, sgemmSize, repeats, warmup, decay, !forwardOnly)
        let bf16 = precision.contains(.bf16)
        let (longest, widest) = (seqLen.max()!, headDim.max()!)
        let out = try Launch.run(ranks: rankOptions.ranks, timeout: max(rankOptions.timeout, 3600), threads: threads) { comm, backend in
            BLAS.threads = threads
            // Refuse before allocating what the machine does not have: q, k, v, o, dO, dq, dk, dv at the longest length,
            // and the baseline's square operands (three in fp32, two bf16 copies) timed in turns with each figure.
            var failure: Error?
            let need = (8 * heads * longest * widest + 4 * sgemmSize * sgemmSize) * MemoryLayout<Float>.size
            if let available = SystemInfo.availableMemory(), need * backend.ranksPerHost > available {
                failure = SeqParError.outOfMemory("the kernel benchmark needs about \(SystemInfo.bytesText(need)) per rank x \(backend.ranksPerHost) rank(s) and this machine has \(SystemInfo.bytesText(available)) available: lower --seq-len, --heads or --sgemm-size, or run fewer ranks")
            }
            if failure == nil && bf16 { do { try OneDNN.require() } catch { failure = error } }
            try comm.agree(failure)
            try comm.barrier()
            let sgemm = try comm.allReduce([KernelBench.sgemmGflops(n: sgemmSize, repeats: repeats, warmup: warmup)], op: .min)[0]
            let matmul = bf16 ? try comm.allReduce([KernelBench.bf16MatmulGflops(n: sgemmSize, repeats: repeats, warmup: warmup)], op: .min)[0] : nil
            let probe = try KernelBench.sgemmProbe(comm: comm)
            let results = try figures.flatMap { k, d, l, causal, p in
                try KernelBench.measure(k, shape: AttentionShape(seqLen: l, heads: heads, headDim: d), causal: causal, decay: decay,
                                        sgemmGflops: sgemm, precision: p, bf16MatmulGflops: matmul, repeats: repeats, warmup: warmup,
                                        backward: backward, comm: comm, profileInTurns: backend.name == "in-process", baselineSize: sgemmSize)
            }.map { var r = $0; r.probeSgemmGflops = probe; return r }
            return (results, backend, sgemm, matmul)
        }
        guard let (results, backend, sgemm, matmul) = out else { return }
        if json { results.forEach { print(Report.json($0)) }; return }
        let columns = [("kernel", 18), ("prec", 5), ("direction", 10), ("L", 7), ("H", 4), ("D", 5), ("mask", 14), ("time_s", 10), ("GFLOP/s", 9),
                       ("rank_min-max", 14), ("baseline", 9), ("ratio", 7), ("gemm", 6), ("softmax", 8), ("exp", 6), ("max", 6), ("other", 6)]
        (Provenance.header("bench kernel") + [
            "# \(backend.ranks) rank(s) at once, backend \(backend.name), \(threads) BLAS thread(s) each; time: the slowest rank's median of \(repeats) after \(warmup) warm-up",
            String(format: "# baseline fp32: OpenBLAS sgemm %dx%dx%d: %.1f GFLOP/s (the slowest rank's)", sgemmSize, sgemmSize, sgemmSize, sgemm)]
            + (matmul.map { [String(format: "# baseline bf16: oneDNN %@ bf16 matmul %dx%dx%d (bf16 in, fp32 out), ISA %@: %.1f GFLOP/s (the slowest rank's)%@",
                                    OneDNN.version ?? "?", sgemmSize, sgemmSize, sgemmSize, OneDNN.isa ?? "?", $0,
                                    OneDNN.hasBF16Matmul ? "" : "; oneDNN has no bf16 matmul here: emulated on OpenBLAS")] } ?? []) + [
            "# baseline (column): that of the row's precision timed in turns with the kernel (one product, one kernel call, ...), median;",
            "# ratio: the median over the turns of the kernel's GFLOP/s over the baseline's just before it (the host's drift moves both)",
            "# FLOPs: softmax forward 4*H*L^2*D (half when causal), backward 2.5x; linear (chunk form, blocks of \(LinearAttention.blockRows)) 8*H*L*D^2 + 4*H*L*\(LinearAttention.blockRows)*D, backward 3x",
            "# gemm, softmax, other: shares of one profiled run's time (each product and each tile's softmax pass timed), adding up to 100%;",
            "# exp: the exponentials' part of softmax (counted x their cost per element in this run); max: the bf16 forward's row maxima",
            "# (timed: the profiled run sweeps them apart from the exponentials)",
            columns.map { Report.pad($0.0, $0.1) }.joined(),
        ]).forEach { print($0) }
        for r in results {
            let mask = r.decay.map { String(format: "causal λ=%g", $0) } ?? (r.causal ? "causal" : "full")
            let cells = [r.kernel, r.precision.rawValue, r.direction, "\(r.seqLen)", "\(r.heads)", "\(r.headDim)", mask, String(format: "%.4f", r.timeS),
                         String(format: "%.1f", r.gflops), String(format: "%.1f-%.1f", r.rankGflopsMin, r.rankGflopsMax),
                         String(format: "%.1f", r.turnBaselineGflops ?? r.bf16MatmulGflops.flatMap { r.precision == .bf16 ? $0 : nil } ?? r.sgemmGflops),
                         String(format: "%.2f", r.ratio),
                         String(format: "%.0f%%", 100 * r.gemmFraction), String(format: "%.0f%%", 100 * r.softmaxFraction),
                         String(format: "%.0f%%", 100 * r.expFraction), String(format: "%.0f%%", 100 * r.maxFraction),
                         String(format: "%.0f%%", 100 * r.otherFraction)]
            print(zip(cells, columns).map { Report.pad($0, $1.1) }.joined())
        }
    }
}

extension BenchKernel: ExpressibleByArgument {}

struct CommBenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "comm",
        abstract: "SeqPar's exchanges (ping-pong, ring step, AllGather, all-to-all) per message size, next to plain MPI doing the same in the same run, OSU style.",
        discussion: """
        Run it under mpirun (mpirun -np 2 seqpar bench comm); with --ranks N it times the in-process backend, which \
        has no MPI baseline. pingpong: half a round trip between ranks 0 and 1; ring: every rank sends SIZE to the \
        next and receives from the previous; allgather: every rank contributes SIZE; alltoall: every rank sends SIZE \
        in all. ratio: SeqPar's time over plain MPI's.
        """)

    @Option(parsing: .upToNextOption, help: "Operations: pingpong, ring, allgather, alltoall.") var operation: [CommBench.Operation] = CommBench.Operation.allCases
    @Option(parsing: .upToNextOption, help: "Message sizes in bytes (default 8 B to 64 MiB, x8 apart).") var size: [Int] = CommBench.defaultSizes
    @Option(help: "Timed runs per figure (the median is reported).") var repeats = 5
    @Flag(help: "One JSON object per figure instead of the table.") var json = false
    @OptionGroup var rankOptions: RankOptions

    func validate() throws {
        guard !operation.isEmpty else { throw ValidationError("--operation: name at least one of pingpong, ring, allgather, alltoall") }
        guard !size.isEmpty, size.allSatisfy({ (1...(1 << 30)).contains($0) }) else { throw ValidationError("--size: give sizes from 1 byte to 1 GiB") }
        guard repeats >= 1 else { throw ValidationError("--repeats \(repeats): must be at least 1") }
    }

    func run() throws {
        let (operations, sizes, repeats) = (operation, size, repeats)
        let out = try Launch.run(ranks: rankOptions.ranks, timeout: rankOptions.timeout) { comm, backend in
            var failure: Error?
            let need = operations.map { op in CommBench.bufferBytes(op, bytes: sizes.max()!, ranks: comm.size) }.max()!
            if let available = SystemInfo.availableMemory(), need * backend.ranksPerHost > available {
                failure = SeqParError.outOfMemory("the largest message needs \(SystemInfo.bytesText(need)) of buffers per rank x \(backend.ranksPerHost) rank(s), more than the \(SystemInfo.bytesText(available)) available: give smaller --size values")
            }
            try comm.agree(failure)
            let baseline = backend.name == "mpi" ? MPIBaseline.make() : nil
            return (try CommBench.measure(operations, sizes: sizes, comm: comm, baseline: baseline, repeats: repeats), backend)
        }
        guard let (results, backend) = out else { return }
        if json { results.forEach { print(Report.json($0)) }; return }
        let columns = [("operation", 11), ("bytes", 11), ("iters", 7), ("time_us", 12), ("MB/s", 11), ("mpi_time_us", 12), ("mpi_MB/s", 11), ("ratio", 7)]
        (Provenance.header("bench comm") + [
            "# \(backend.ranks) rank(s), backend \(backend.name), " + (backend.name == "mpi" ? "\(backend.ranksPerHost) on this host" : "no plain-MPI baseline"),
            "# time: the slowest rank's mean per call, median of \(repeats) runs; pingpong is half a round trip; MB/s = bytes moved per rank / time (allgather: (P-1) x bytes received)",
            "# baseline: plain MPI_Send/MPI_Recv, MPI_Sendrecv, MPI_Allgather, MPI_Alltoall on MPI_COMM_WORLD, same sizes, same run; ratio = time / mpi_time",
            columns.map { Report.pad($0.0, $0.1) }.joined(),
        ]).forEach { print($0) }
        if backend.ranks < 2 { printNote("pingpong needs 2 ranks or more: skipped") }
        for r in results {
            let cells = [r.operation, "\(r.bytes)", "\(r.iterations)", String(format: "%.2f", r.timeS * 1e6), String(format: "%.1f", r.bandwidthBps / 1e6),
                         r.mpiTimeS.map { String(format: "%.2f", $0 * 1e6) } ?? "-", r.mpiBandwidthBps.map { String(format: "%.1f", $0 / 1e6) } ?? "-",
                         r.timeRatio.map { String(format: "%.2f", $0) } ?? "-"]
            print(zip(cells, columns).map { Report.pad($0, $1.1) }.joined())
        }
    }
}

extension CommBench.Operation: ExpressibleByArgument {}

struct OverlapBenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "overlap",
        abstract: "Ring attention's communication/compute overlap: the exchanges alone, the compute alone, and the real fused step, with and without progress calls between tiles.",
        discussion: "overlap = (t_comm + t_compute - t_fused) / min(t_comm, t_compute). Run it under mpirun (e.g. mpirun -np 2 seqpar bench overlap) or with --ranks N.")

    @Option(help: "Sequence length L.") var seqLen = 2048
    @Option(help: "Query heads H.") var heads = 8
    @Option(help: "Key/value heads G (default H).") var kvHeads: Int?
    @Option(help: "Head dimension D.") var headDim = 128
    @Flag(help: "Causal mask.") var causal = false
    @Option(help: "Sequence layout over ranks.") var layout: SequenceLayout = .contiguous
    @Option(help: "Precision: fp32, or bf16 (K/V blocks sent in bf16, half the bytes; kernels on bf16 operands; needs oneDNN).") var precision: Precision = .fp32
    @Option(help: "Timed repetitions (the median is reported).") var repeats = 10
    @Option(help: "Untimed repetitions first.") var warmup = 2
    @Flag(help: "Forward only.") var forwardOnly = false
    @Flag(help: "One JSON object per direction instead of the table.") var json = false
    @OptionGroup var rankOptions: RankOptions

    func validate() throws {
        for (name, v) in [("--seq-len", seqLen), ("--heads", heads), ("--kv-heads", kvHeads ?? heads), ("--head-dim", headDim), ("--repeats", repeats)] where v < 1 {
            throw ValidationError("\(name) \(v): must be at least 1")
        }
        guard warmup >= 0 else { throw ValidationError("--warmup \(warmup): must be 0 or more") }
        guard heads % (kvHeads ?? heads) == 0 else { throw ValidationError("--kv-heads \(kvHeads!) does not divide --heads \(heads)") }
    }

    func run() throws {
        let shape = AttentionShape(seqLen: seqLen, heads: heads, kvHeads: kvHeads ?? heads, headDim: headDim)
        var o = AttentionOptions(causal: causal, layout: layout)
        o.precision = precision
        let options = o
        let (repeats, warmup, backward) = (self.repeats, self.warmup, !forwardOnly)
        let out = try Launch.run(ranks: rankOptions.ranks, timeout: rankOptions.timeout) { comm, backend in
            (try RingOverlap.measure(shape: shape, options: options, comm: comm, repeats: repeats, warmup: warmup, backward: backward), backend)
        }
        guard let (results, backend) = out else { return }
        if json { results.forEach { print(Report.json($0)) }; return }
        let modes = RingProgress.allCases.map(\.rawValue)
        (Provenance.header("bench overlap") + [
            "# ring attention, \(backend.ranks) rank(s), backend \(backend.name); \(shape), \(causal ? "causal" : "full"), layout \(layout.rawValue), precision \(precision.rawValue)",
            "# K/V block per ring step \(SystemInfo.bytesText(results[0].blockBytes)); slowest rank's time, median of \(repeats) after \(warmup) warm-up",
            "# overlap = (t_comm + t_compute - t_fused) / min(t_comm, t_compute), per progress mode: none (moves at the wait), tests (MPI_Test between tiles), thread (a progress thread); this run's standard: \(results[0].progress.rawValue)",
            (["direction", "t_comm_s", "t_compute_s"] + modes.map { "fused_\($0)_s" } + modes.map { "overlap_\($0)" }).map { Report.pad($0, 15) }.joined(),
        ]).forEach { print($0) }
        for r in results {
            print(([r.direction, String(format: "%.5f", r.tCommS), String(format: "%.5f", r.tComputeS)]
                   + modes.map { String(format: "%.5f", r.tFusedByProgress[$0] ?? .nan) }
                   + modes.map { String(format: "%.0f%%", 100 * (r.overlapByProgress[$0] ?? .nan)) }).map { Report.pad($0, 15) }.joined())
        }
    }
}

struct AttentionBenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "attention",
        abstract: "Step time of one or more algorithms on the same problem in one launch: forward and backward, tokens/s, GFLOP/s, bytes and peak memory per rank.",
        discussion: """
        Run it under mpirun (mpirun -np 4 seqpar bench attention --algorithm lasp2 lasp1 ring) or with --ranks N. \
        Softmax algorithms use --causal and --layout; linear ones (lasp1, lasp2) are causal unless --bidirectional, \
        contiguous, with --decay and --feature-map. rel_time is each figure's time over the first algorithm's.
        """)

    @Option(parsing: .upToNextOption, help: "Algorithms, timed in this order.") var algorithm: [AlgorithmName]
    @Option(help: "Sequence length L.") var seqLen = 16384
    @Option(help: "Query heads H.") var heads = 8
    @Option(help: "Key/value heads G (default H).") var kvHeads: Int?
    @Option(help: "Head dimension D.") var headDim = 128
    @Option(help: "Batch size B.") var batch = 1
    @Flag(help: "Causal mask for softmax algorithms.") var causal = false
    @Flag(help: "Bidirectional linear attention (no decay).") var bidirectional = false
    @Option(help: "Sequence layout for softmax algorithms.") var layout: SequenceLayout = .contiguous
    @OptionGroup var documentOptions: DocumentOptions
    @Option(parsing: .upToNextOption, help: "usp: Ulysses degrees U, one run of usp per value (e.g. 4 2 for 4x4 and 2x8 grids on 16 ranks).") var ulyssesDegree: [Int] = []
    @Option(parsing: .upToNextOption, help: "How tokens are split over ranks: equal, or speed (in proportion to each rank's speed, probed just before; helps where ranks run at different speeds and work grows with tokens: ring with zigzag, allgather, RSA, LASP). Several: each algorithm under each, in turn.") var balance: [SpeedBalance.Mode] = [.equal]
    @Option(help: "Linear attention decay: one value or one per head, comma-separated.") var decay = "1"
    @Option(help: "Linear attention feature map: identity or elu1.") var featureMap: FeatureMap = .identity
    @Option(help: "Precision of every algorithm and baseline: fp32, or bf16 (inputs rounded to bf16, products on bf16 operands, K/V sent in bf16; needs oneDNN).") var precision: Precision = .fp32
    @Option(help: "Timed repetitions (the median is reported).") var repeats = 5
    @Option(help: "Untimed repetitions first.") var warmup = 1
    @Flag(help: "Forward only.") var forwardOnly = false
    @Flag(help: "Skip the single-rank baseline (dense, or the linear kernel on one rank) and so the efficiency column.") var noBaseline = false
    @Option(help: "Run the baseline at this length instead of --seq-len (efficiency then compares GFLOP/s).") var baselineSeqLen: Int?
    @Flag(help: "Run the one-rank baseline on every rank at once (the slowest copy counts): efficiency then leaves out the host's contention.") var busyBaseline = false
    @Flag(help: "Also measure ring attention's communication overlap (t_comm, t_compute, t_fused; slower).") var overlap = false
    @Flag(help: "Profile one more step of each direction: per rank, the shares of its time in the products, the softmax passes, communication and the rest (JSON field profile_ranks; every rank under MPI, rank 0 in process).") var profile = false
    @Flag(help: "One JSON object per figure instead of the table.") var json = false
    @OptionGroup var rankOptions: RankOptions
    @OptionGroup var threadOptions: ThreadOptions

    func validate() throws {
        guard !algorithm.isEmpty else { throw ValidationError("--algorithm: name at least one") }
        if let b = baselineSeqLen, b < 1 { throw ValidationError("--baseline-seq-len \(b): must be at least 1") }
        if busyBaseline && noBaseline { throw ValidationError("--busy-baseline runs the baseline that --no-baseline skips: give one of them") }
        for (name, v) in [("--seq-len", seqLen), ("--heads", heads), ("--kv-heads", kvHeads ?? heads), ("--head-dim", headDim),
                          ("--batch", batch), ("--repeats", repeats)] where v < 1 {
            throw ValidationError("\(name) \(v): must be at least 1")
        }
        guard warmup >= 0 else { throw ValidationError("--warmup \(warmup): must be 0 or more") }
        _ = try Attention.parseDecay(decay)
        if algorithm.contains(.usp) != !ulyssesDegree.isEmpty {
            throw ValidationError(algorithm.contains(.usp) ? "--algorithm usp needs --ulysses-degree U (one or more degrees)" : "--ulysses-degree applies to --algorithm usp: add it, or drop the degrees")
        }
        if documentOptions.given && baselineSeqLen != nil {
            throw ValidationError("--baseline-seq-len cannot keep the documents of --doc-lens/--cu-seqlens: the baseline runs the same documents at --seq-len; drop it")
        }
    }

    func options(_ a: AlgorithmName) throws -> AttentionOptions {
        var o = a.family == .linear
            ? AttentionOptions(causal: !bidirectional, layout: .contiguous, decay: try Attention.parseDecay(decay), featureMap: featureMap)
            : AttentionOptions(causal: causal, layout: layout)
        o.precision = precision
        o.documents = try documentOptions.documents(seqLen: seqLen)
        return o
    }

    func run() throws {
        let shape = AttentionShape(batch: batch, seqLen: seqLen, heads: heads, kvHeads: kvHeads ?? heads, headDim: headDim)
        let runs = try algorithm.flatMap { a in
            try (a == .usp ? ulyssesDegree.map(Optional.some) : [nil]).map { u in
                var o = try options(a)
                o.ulyssesDegree = u
                return (a, o)
            }
        }
        let (repeats, warmup, backward, measureOverlap, busy, balances, profile) = (self.repeats, self.warmup, !forwardOnly, overlap, busyBaseline, balance, self.profile)
        // One baseline per family present, on the first such algorithm's options, contiguous.
        let baselineShape = AttentionShape(batch: batch, seqLen: baselineSeqLen ?? seqLen, heads: heads, kvHeads: kvHeads ?? heads, headDim: headDim)
        let baselines: [(AlgorithmName.Family, AttentionOptions)] = noBaseline ? [] : [AlgorithmName.Family.softmax, .linear].compactMap { f in
            runs.first { $0.0.family == f }.map { _, o in var o = o; o.layout = .contiguous; return (f, o) }
        }
        let out = try Launch.run(ranks: rankOptions.ranks, timeout: rankOptions.timeout, threads: threadOptions.threads) { comm, backend in
            let placement = try AttentionBench.placement(comm: comm)
            var results = try runs.flatMap { a, o in
                try balances.flatMap { b in
                    try AttentionBench.measure(a, shape: shape, options: o, comm: comm, ranksPerHost: backend.ranksPerHost,
                                               repeats: repeats, warmup: warmup, backward: backward, balance: b,
                                               profile: !profile ? .none : backend.name == "mpi" ? .allRanks : .rankZero)
                }
            }
            let overlaps = try measureOverlap ? runs.filter { $0.0 == .ring }.prefix(1).flatMap { _, o in
                try RingOverlap.measure(shape: shape, options: o, comm: comm, repeats: repeats, warmup: warmup, backward: backward, modes: [.standard])
            } : []
            var missing: [String] = []
            for (family, o) in baselines {
                let b = try AttentionBench.baseline(shape: baselineShape, options: o, family: family, comm: comm, ranksPerHost: backend.ranksPerHost,
                                                    repeats: repeats, warmup: warmup, backward: backward, everyRank: busy)
                if b == nil { missing.append("\(family)") }
                results = results.map { $0.algorithm.family == family ? AttentionBench.annotate([$0], baseline: b, overlap: overlaps)[0] : $0 }
            }
            if baselines.isEmpty { results = AttentionBench.annotate(results, baseline: nil, overlap: overlaps) }
            return (results, backend, placement, missing)
        }
        guard let (results, backend, placement, missing) = out else { return }
        for family in missing { printNote("no \(family) baseline: one rank would not fit the whole sequence in memory; give --baseline-seq-len N for a shorter one") }
        if json { results.forEach { print(Report.json($0)) }; return }
        let columns = [("algorithm", 13), ("direction", 10), ("mask", 14), ("layout", 17), ("time_s", 10), ("min_s", 10), ("max_s", 10),
                       ("rank_spread", 12), ("tokens/s", 11), ("GFLOP/s", 9), ("efficiency", 11), ("overlap", 8), ("wait_s", 16), ("sent_B/rank", 13), ("msgs", 6), ("colls", 6),
                       ("peak_rss", 11), ("rel_time", 9)]
        let baselineNote = results.compactMap { r in r.baselineTimeS.map { String(format: "%@ %@ %.4f s", r.algorithm.family == .softmax ? "dense" : "linear", r.direction, $0) } }
        (Provenance.header("bench attention") + Provenance.placementLines(placement) + [
            "# \(backend.ranks) rank(s), backend \(backend.name); \(shape); precision \(precision.rawValue); median of \(repeats) after \(warmup) warm-up, slowest rank per repetition",
            "# rank_spread: slowest rank's median over the fastest's; rel_time: time over the first algorithm's in the same direction",
            "# wait_s: seconds per step blocked in communication (waits, collectives), least-most over ranks",
            "# efficiency: GFLOP/s over ranks x the one-rank baseline's (same launch" + (baselineSeqLen.map { ", L=\($0)" } ?? "")
                + (busyBaseline ? ", run on every rank at once: the host's contention left out" : "") + "): " + (Array(Set(baselineNote)).sorted().joined(separator: ", ").nonEmpty ?? "none ran"),
            columns.map { Report.pad($0.0, $0.1) }.joined(),
        ]).forEach { print($0) }
        for r in results {
            let first = results.first { $0.direction == r.direction }!
            let mask = r.decay.map { d in r.causal ? "causal λ=\(Set(d).count == 1 ? String(format: "%g", d[0]) : "per-head")" : "bidirectional" } ?? (r.causal ? "causal" : "full")
                + (r.documents.map { " \($0)doc" } ?? "")
            let cells = [r.algorithm.rawValue + (r.ulyssesDegree.map { " \($0)x\(r.ranks / $0)" } ?? ""), r.direction, mask, r.layout.rawValue + (r.balance == .speed ? "+speed" : ""), String(format: "%.4f", r.timeS),
                         String(format: "%.4f", r.timeMinS), String(format: "%.4f", r.timeMaxS), String(format: "%.2f", r.rankTimeMaxS / r.rankTimeMinS),
                         String(format: "%.0f", r.tokensPerS), String(format: "%.1f", r.gflops),
                         r.efficiency.map { String(format: "%.2f", $0) } ?? "-", r.overlap.map { String(format: "%.0f%%", 100 * $0) } ?? "-",
                         Report.waits(least: r.waitMinS, most: r.waitS), "\(r.bytesSent)", "\(r.messages)", "\(r.collectives)",
                         SystemInfo.bytesText(r.peakRSSBytes), String(format: "%.2f", r.timeS / first.timeS)]
            print(zip(cells, columns).map { Report.pad($0, $1.1) }.joined())
        }
    }
}

struct LatentBenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "latent",
        abstract: "Decode-step latency of latent attention (TP-MLA, TPLA) on one cache, with the cache bytes each rank reads per step.",
        discussion: "Run it under mpirun (mpirun -np 4 seqpar bench latent --algorithm tp-mla tpla --seq-len 32768 --heads 16) or with --ranks N. speedup: the first algorithm's step time over each one's.")

    @Option(parsing: .upToNextOption, help: "Algorithms, timed in this order (tp-mla, tpla; mla on one rank).") var algorithm: [LatentAlgorithm]
    @Option(parsing: .upToNextOption, help: "Cached tokens L (one run per value).") var seqLen: [Int] = [32768]
    @Option(parsing: .upToNextOption, help: "Heads H (one run per value).") var heads: [Int] = [16]
    @Option(help: "Latent dimension d_c.") var latentDim = 512
    @Option(help: "RoPE dimension d_r.") var ropeDim = 64
    @Option(help: "Value dimension d_v.") var vDim = 128
    @Option(help: "Query tokens per step.") var queries = 1
    @Option(help: "Transform for TPLA: none, hadamard or pca (it does not change the cost).") var transform: LatentTransform = .none
    @Option(help: "Precision: fp32 (the reference, OpenBLAS) or bf16 (the cache packed bf16, half the bytes; the kernel on oneDNN; scores, softmax and outputs fp32).")
    var precision: Precision = .fp32
    @Option(help: "Timed steps (the median is reported).") var repeats = 20
    @Option(help: "Untimed steps first.") var warmup = 3
    @Flag(help: "One JSON object per figure instead of the table.") var json = false
    @OptionGroup var rankOptions: RankOptions

    func validate() throws {
        guard !algorithm.isEmpty else { throw ValidationError("--algorithm: name at least one") }
        let sizes = [("--latent-dim", latentDim), ("--v-dim", vDim), ("--queries", queries), ("--repeats", repeats)]
            + seqLen.map { ("--seq-len", $0) } + heads.map { ("--heads", $0) }
        for (name, v) in sizes where v < 1 {
            throw ValidationError("\(name) \(v): must be at least 1")
        }
        guard ropeDim >= 0, warmup >= 0 else { throw ValidationError("--rope-dim and --warmup must be 0 or more") }
    }

    func run() throws {
        let runs = seqLen.flatMap { l in heads.map { h in LatentShape(seqLen: l, queries: queries, heads: h, latentDim: latentDim, ropeDim: ropeDim, vDim: vDim) } }
        let (algorithms, transform, precision, repeats, warmup) = (algorithm, self.transform, self.precision, self.repeats, self.warmup)
        let out = try Launch.run(ranks: rankOptions.ranks, timeout: rankOptions.timeout) { comm, backend in
            (try runs.flatMap { s in
                try algorithms.map {
                    try LatentBench.measure($0, shape: s, transform: transform, precision: precision, comm: comm, ranksPerHost: backend.ranksPerHost,
                                            repeats: repeats, warmup: warmup)
                }
            }, backend)
        }
        guard let (results, backend) = out else { return }
        if json { results.forEach { print(Report.json($0)) }; return }
        let columns = [("algorithm", 10), ("L", 8), ("H", 5), ("step_s", 11), ("min_s", 11), ("max_s", 11), ("attend_s", 11),
                       ("cache_B/rank", 14), ("cache_GB/s", 11), ("sent_B", 9), ("peak_rss", 11), ("speedup", 8)]
        (Provenance.header("bench latent") + [
            "# \(backend.ranks) rank(s), backend \(backend.name); T=\(queries) d_c=\(latentDim) d_r=\(ropeDim) d_v=\(vDim), transform \(transform.rawValue), \(precision.rawValue); median of \(repeats) steps after \(warmup), slowest rank",
            "# cache_B/rank: latent cache each rank reads per step; speedup: the first algorithm's step time over this one's (same L, H)",
            columns.map { Report.pad($0.0, $0.1) }.joined(),
        ]).forEach { print($0) }
        for r in results {
            let first = results.first { $0.seqLen == r.seqLen && $0.heads == r.heads }!
            let cells = [r.algorithm.rawValue, "\(r.seqLen)", "\(r.heads)", String(format: "%.6f", r.timeS), String(format: "%.6f", r.timeMinS),
                         String(format: "%.6f", r.timeMaxS), String(format: "%.6f", r.attendS), "\(r.cacheBytesPerRank)", String(format: "%.1f", r.cacheGBps),
                         "\(r.bytesSent)", SystemInfo.bytesText(r.peakRSSBytes), String(format: "%.2f", first.timeS / r.timeS)]
            print(zip(cells, columns).map { Report.pad($0, $1.1) }.joined())
        }
    }
}

extension LatentAlgorithm: ExpressibleByArgument {}

extension String {
    /// nil for the empty string.
    var nonEmpty: String? { isEmpty ? nil : self }
}
