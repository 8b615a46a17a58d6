// The built `seqpar` under a real `mpirun -np 1/2/3/4` (and the same runs on the in-process backend): the
// communication self-test, attention checked against the oracle, and bad input that must fail with a clear
// message on every rank and never hang. OpenMPI settings come from launch/env.openmpi, as for a user.
import Foundation
import Testing

/// Runs a command with a time limit; a hang is a test failure, not a stuck CI job.
struct Run {
    var status: Int32
    var output: String
    var timedOut: Bool
    /// Wall time from start to exit.
    var seconds: Double = 0
    /// When the `during` action of `Harness.run` finished, in seconds from the start (nil if it never did).
    var actionAt: Double?
}

enum Harness {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    /// The seqpar binary next to this test bundle (SEQPAR_BIN overrides).
    static var binary: String {
        if let b = ProcessInfo.processInfo.environment["SEQPAR_BIN"] { return b }
        let dir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        for candidate in [dir, dir.deletingLastPathComponent()] {
            let path = candidate.appendingPathComponent("seqpar").path
            if FileManager.default.isExecutableFile(atPath: path) { return path }
        }
        return root.appendingPathComponent(".build/debug/seqpar").path
    }

    /// launch/env.openmpi's exports.
    static let mpiEnvironment: [String: String] = {
        var env = ProcessInfo.processInfo.environment
        let text = (try? String(contentsOf: root.appendingPathComponent("launch/env.openmpi"), encoding: .utf8)) ?? ""
        for line in text.split(separator: "\n") where line.hasPrefix("export ") {
            let code = line.split(separator: "#", maxSplits: 1)[0].dropFirst("export ".count)
            for assignment in code.split(separator: " ") {
                let kv = assignment.split(separator: "=", maxSplits: 1).map(String.init)
                guard kv.count == 2 else { continue }
                var value = kv[1]
                if value.hasPrefix("${"), let def = value.range(of: ":-") { value = String(value[def.upperBound...].dropLast()) }
                env[kv[0]] = value
            }
        }
        env["SWIFT_BACKTRACE"] = "enable=no"
        return env
    }()

    /// `during`: from `after` seconds on, `action` is called every 50 ms while the command runs until it returns true
    /// (a fault a test injects mid-run: a signal, a cut link).
    static func run(_ arguments: [String], timeout: Double = 180, directory: URL? = nil, environment: [String: String] = [:],
                    during: (after: Double, action: () -> Bool)? = nil) throws -> Run {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = arguments
        p.environment = mpiEnvironment.merging(environment) { $1 }
        if let d = directory { p.currentDirectoryURL = d }
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = pipe
        try p.run()
        // Read while it runs so a full pipe cannot block it.
        final class Sink: @unchecked Sendable { var data = Data() }
        let sink = Sink()
        let reader = Thread { sink.data = pipe.fileHandleForReading.readDataToEndOfFile() }
        reader.start()
        let start = Date()
        let deadline = Date(timeIntervalSinceNow: timeout)
        var actionAt: Double?
        while p.isRunning && Date() < deadline {
            if let d = during, actionAt == nil, -start.timeIntervalSinceNow >= d.after, d.action() { actionAt = -start.timeIntervalSinceNow }
            Thread.sleep(forTimeInterval: 0.05)
        }
        let timedOut = p.isRunning
        if timedOut { kill(-p.processIdentifier, SIGKILL); p.terminate(); kill(p.processIdentifier, SIGKILL) }
        p.waitUntilExit()
        let seconds = -start.timeIntervalSinceNow
        while !reader.isFinished { Thread.sleep(forTimeInterval: 0.01) }
        return Run(status: p.terminationStatus, output: String(decoding: sink.data, as: UTF8.self), timedOut: timedOut,
                   seconds: seconds, actionAt: actionAt)
    }

    static func mpirun(_ np: Int, _ arguments: [String], timeout: Double = 180, environment: [String: String] = [:],
                       during: (after: Double, action: () -> Bool)? = nil) throws -> Run {
        try run(["mpirun", "-np", "\(np)"] + environment.keys.sorted().flatMap { ["-x", $0] } + [binary] + arguments,
                timeout: timeout, environment: environment, during: during)
    }

    static func simulated(_ arguments: [String], timeout: Double = 180) throws -> Run {
        try run([binary] + arguments, timeout: timeout)
    }

    /// Processes whose environment holds SEQPAR_TEST_TAG=`tag` (and, given `rank`, OMPI_COMM_WORLD_RANK=`rank`):
    /// a test tags its launch to find its ranks, to signal one, or to show that none is left.
    static func processes(tagged tag: String, rank: Int? = nil) -> [Int32] {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
        return entries.compactMap(Int32.init).filter { pid in
            guard pid != getpid(), let env = FileManager.default.contents(atPath: "/proc/\(pid)/environ") else { return false }
            let vars = env.split(separator: 0).map { String(decoding: $0, as: UTF8.self) }
            return vars.contains("SEQPAR_TEST_TAG=\(tag)") && (rank.map { vars.contains("OMPI_COMM_WORLD_RANK=\($0)") } ?? true)
        }
    }

    /// A tag no other launch uses.
    static func uniqueTag() -> String { "\(getpid())-\(UInt32.random(in: 0...UInt32.max))" }

    static var mpirunAvailable: Bool {
        ((try? run(["mpirun", "--version"], timeout: 30))?.status ?? 1) == 0
    }
}

@Suite(.serialized) struct MPILaunchTests {
    init() {
        precondition(FileManager.default.isExecutableFile(atPath: Harness.binary), "seqpar binary not found at \(Harness.binary): run `swift build` first")
    }

    @Test(arguments: [1, 2, 3, 4]) func selfTestUnderMPI(np: Int) throws {
        let r = try Harness.mpirun(np, ["selftest"])
        #expect(!r.timedOut && r.status == 0, "\(r.output)")
        #expect(r.output.contains("checks passed on \(np) rank(s), backend mpi"), "\(r.output)")
    }

    /// Every distributed algorithm forward and backward checked against the oracle under mpirun, causal zigzag and
    /// full contiguous, with L = 50 (not divisible by 3, 4, or 2P). GQA: 4 heads over 2 kv heads (Ulysses, which
    /// shards heads: 2P over P).
    @Test(arguments: [1, 2, 3, 4]) func distributedChecksUnderMPI(np: Int) throws {
        for algorithm in ["allgather", "ring", "rsa", "ulysses"] {
          let heads = algorithm == "ulysses" ? [String(2 * np), String(np)] : ["4", "2"]
          for extra in [["--causal", "--layout", "zigzag"], ["--layout", "contiguous"]] {
            let r = try Harness.mpirun(np, ["attention", "--algorithm", algorithm, "--seq-len", "50", "--heads", heads[0], "--kv-heads", heads[1],
                                            "--head-dim", "16", "--backward", "--check"] + extra)
            #expect(!r.timedOut && r.status == 0, "\(r.output)")
            #expect(r.output.contains(": PASS"), "\(r.output)")
          }
        }
    }

    /// Packed documents under mpirun: every softmax algorithm, causal zigzag (per document) and full contiguous,
    /// forward and backward, against the oracle with the document mask; a boundary at a chunk edge and a document of
    /// one token (L = 61: chunks of 61/P).
    @Test(arguments: [2, 3, 4]) func documentsUnderMPI(np: Int) throws {
        let lengths = [61 / np, 1, 3, 61 - 61 / np - 4].filter { $0 > 0 }.map(String.init).joined(separator: ",")
        for algorithm in ["allgather", "ring", "rsa", "ulysses"] {
            let heads = algorithm == "ulysses" ? [String(2 * np), String(np)] : ["4", "2"]
            for extra in [["--causal", "--layout", "zigzag"], ["--layout", "contiguous"]] {
                let r = try Harness.mpirun(np, ["attention", "--algorithm", algorithm, "--seq-len", "61", "--heads", heads[0], "--kv-heads", heads[1],
                                                "--head-dim", "16", "--doc-lens", lengths, "--backward", "--check"] + extra)
                #expect(!r.timedOut && r.status == 0 && r.output.contains(": PASS"), "\(algorithm) \(extra) \(lengths): \(r.output)")
            }
        }
    }

    /// `bench documents --rounds`: packed, padded and separate measured in turn; per direction each run's over_sum is
    /// the median of the rounds' (separate's is 1 exactly), lying within their range.
    @Test func documentsBenchInRounds() throws {
        let r = try Harness.simulated(["bench", "documents", "--algorithm", "ring", "--doc-lens", "40,7,49", "--heads", "2", "--head-dim", "16",
                                       "--ranks", "2", "--repeats", "1", "--warmup", "0", "--rounds", "3", "--json"], timeout: 300)
        #expect(!r.timedOut && r.status == 0, "\(r.output)")
        let figures = r.output.split(separator: "\n").filter { $0.hasPrefix("{") }.compactMap {
            try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any]
        }
        #expect(figures.count == 6, "\(r.output)")
        for f in figures {
            let (over, lo, hi) = (f["over_sum"] as? Double ?? -1, f["over_sum_min"] as? Double ?? -1, f["over_sum_max"] as? Double ?? -1)
            #expect(f["rounds"] as? Int == 3 && lo > 0 && lo <= over && over <= hi, "\(f)")
            if f["run"] as? String == "separate" { #expect(over == 1 && lo == 1 && hi == 1, "\(f)") }
        }
    }

    /// USP under mpirun on MPI sub-communicators: the issue's command (4 ranks, 2 x 2, documents, GQA), and the grids
    /// of 4 ranks with and without documents, both layouts.
    @Test func uspUnderMPI() throws {
        let done = try Harness.mpirun(4, ["attention", "--algorithm", "usp", "--ulysses-degree", "2", "--layout", "zigzag", "--causal", "--backward",
                                          "--doc-lens", "1000,1,2000", "--heads", "4", "--kv-heads", "2", "--head-dim", "64", "--check"], timeout: 300)
        #expect(!done.timedOut && done.status == 0 && done.output.contains(": PASS"), "\(done.output)")
        for degree in ["1", "2", "4"] {
            for extra in [["--causal", "--layout", "zigzag", "--doc-lens", "20,1,40"], ["--layout", "contiguous"]] {
                let r = try Harness.mpirun(4, ["attention", "--algorithm", "usp", "--ulysses-degree", degree, "--seq-len", "61", "--heads", "8", "--kv-heads", "4",
                                               "--head-dim", "16", "--backward", "--check"] + extra)
                #expect(!r.timedOut && r.status == 0 && r.output.contains(": PASS"), "U=\(degree) \(extra): \(r.output)")
            }
        }
    }

    /// Ring attention under mpirun in each progress mode, causal contiguous (ranks skip blocks while accumulators pass
    /// through them) and zigzag, forward and backward checked: real buffers in flight, which the in-process backend
    /// (it copies a message when it is sent) cannot show.
    @Test(arguments: [3, 4]) func ringProgressModesUnderMPI(np: Int) throws {
        for mode in ["thread", "tests", "none"] {
            for layout in ["contiguous", "zigzag"] {
                let r = try Harness.mpirun(np, ["attention", "--algorithm", "ring", "--seq-len", "203", "--heads", "4", "--kv-heads", "2",
                                                "--head-dim", "16", "--causal", "--layout", layout, "--backward", "--check"],
                                           environment: ["SEQPAR_RING_PROGRESS": mode])
                #expect(!r.timedOut && r.status == 0 && r.output.contains(": PASS"), "\(mode) \(layout): \(r.output)")
            }
        }
    }

    /// LASP-1 and LASP-2 under mpirun -np 1 to 4: causal with per-head decay and elu1, bidirectional, L not divisible by P;
    /// LASP-2 sends one state per head per pass whatever L is, and matches the in-process run bit for bit.
    @Test(arguments: [1, 2, 3, 4]) func linearAttentionUnderMPI(np: Int) throws {
        for algorithm in ["lasp1", "lasp2"] {
            for extra in [["--decay", "0.9,0.95,0.99,1", "--feature-map", "elu1"], ["--bidirectional"]] {
                let r = try Harness.mpirun(np, ["attention", "--algorithm", algorithm, "--seq-len", "301", "--heads", "4", "--kv-heads", "2",
                                                "--head-dim", "32", "--backward", "--check"] + extra)
                #expect(!r.timedOut && r.status == 0 && r.output.contains(": PASS"), "\(algorithm) \(extra): \(r.output)")
            }
        }
        let args = ["attention", "--algorithm", "lasp2", "--seq-len", "1001", "--heads", "4", "--head-dim", "16", "--decay", "0.9",
                    "--backward", "--check", "--json"]
        let mpi = try Harness.mpirun(np, args), sim = try Harness.simulated(args + ["--ranks", "\(np)"])
        func field(_ name: String, _ text: String) -> String? {
            text.range(of: "\"\(name)\":[^,}]*", options: .regularExpression).map { String(text[$0]) }
        }
        #expect(field("forward_error", mpi.output) != nil && field("forward_error", mpi.output) == field("forward_error", sim.output), "\(mpi.output)\n\(sim.output)")
        #expect(field("dk_error", mpi.output) == field("dk_error", sim.output), "\(mpi.output)\n\(sim.output)")
        #expect(mpi.output.contains("\"bytes_sent\":[\(Array(repeating: "\(2 * 4 * 16 * 16 * 4)", count: np).joined(separator: ","))]"), "\(mpi.output)")
    }

    /// Packed documents under mpirun -np 3: the issue's acceptance command (`--algorithm lasp2 --doc-lens 500,501
    /// --decay 0.9 --check`, with the --seq-len it needs), then LASP-1 and the bidirectional form with backward over
    /// documents that cross chunk edges, with a one-token document: each passes its oracle check.
    @Test func linearAttentionWithDocumentsUnderMPI() throws {
        for args in [["--algorithm", "lasp2", "--doc-lens", "500,501", "--seq-len", "1001", "--decay", "0.9"],
                     ["--algorithm", "lasp1", "--doc-lens", "40,1,99,161", "--seq-len", "301", "--decay", "0.9", "--backward"],
                     ["--algorithm", "lasp2", "--doc-lens", "40,1,99,161", "--seq-len", "301", "--bidirectional", "--backward"]] {
            let r = try Harness.mpirun(3, ["attention"] + args + ["--heads", "2", "--head-dim", "16", "--check"])
            #expect(!r.timedOut && r.status == 0 && r.output.contains(": PASS"), "\(args): \(r.output)")
        }
    }

    /// LASP-2H: the hybrid stack under mpirun, forward and backward, checked against the Double stack.
    @Test func hybridStackUnderMPI() throws {
        let r = try Harness.mpirun(3, ["attention", "--algorithm", "lasp2h", "--layers", "LSLL", "--seq-len", "301", "--heads", "4",
                                       "--kv-heads", "2", "--head-dim", "16", "--decay", "0.9", "--feature-map", "elu1", "--backward", "--check"])
        #expect(!r.timedOut && r.status == 0 && r.output.contains(": PASS"), "\(r.output)")
    }

    /// Latent attention under mpirun: mla on one rank, tp-mla and tpla (no transform, Hadamard, PCA) on
    /// 2 and 4, each against its Double definition; TPLA reports its distance from MLA.
    @Test(arguments: [1, 2, 4]) func latentAttentionUnderMPI(np: Int) throws {
        let base = ["attention", "--seq-len", "517", "--queries", "2", "--heads", "8", "--latent-dim", "64", "--rope-dim", "16", "--v-dim", "32", "--check"]
        let runs: [[String]] = np == 1 ? [["--algorithm", "mla"], ["--algorithm", "tpla"]]
            : [["--algorithm", "tp-mla"], ["--algorithm", "tpla"], ["--algorithm", "tpla", "--transform", "hadamard", "--outlier-channels", "4"],
               ["--algorithm", "tpla", "--transform", "pca"]]
        for extra in runs {
            let r = try Harness.mpirun(np, base + extra)
            #expect(!r.timedOut && r.status == 0 && r.output.contains(": PASS"), "\(extra): \(r.output)")
            if extra.contains("tpla") { #expect(r.output.contains("tpla vs mla: max relative difference"), "\(r.output)") }
        }
    }

    /// seqpar decode end to end under mpirun -np 2: ring prefill checked against one process, the handoff, and
    /// decode steps; TP-MLA's decode equals MLA; a TPLA step is one all-reduce.
    @Test func decodeUnderMPI() throws {
        let base = ["decode", "--prompt-len", "301", "--steps", "3", "--heads", "8", "--model-dim", "64", "--latent-dim", "64",
                    "--rope-dim", "8", "--nope-dim", "16", "--v-dim", "16", "--check"]
        for extra in [["--algorithm", "tpla", "--transform", "pca"], ["--algorithm", "tp-mla"]] {
            let r = try Harness.mpirun(2, base + extra)
            #expect(!r.timedOut && r.status == 0 && r.output.contains(": PASS"), "\(extra): \(r.output)")
        }
        let r = try Harness.mpirun(2, base + ["--algorithm", "tpla", "--json"])
        #expect(r.output.contains("\"step_collectives\":1") && r.output.contains("\"step_messages\":0"), "\(r.output)")
    }

    /// Ring attention and RSA with each way of progressing the exchanges (a progress thread, MPI_Test between tiles,
    /// nothing until the wait): the same answer under MPI_THREAD_MULTIPLE.
    @Test(arguments: ["thread", "tests", "none"]) func ringProgressModesUnderMPI(mode: String) throws {
        for algorithm in ["ring", "rsa"] {
            let r = try Harness.mpirun(3, ["attention", "--algorithm", algorithm, "--seq-len", "301", "--heads", "4", "--kv-heads", "2",
                                           "--head-dim", "32", "--causal", "--layout", "zigzag", "--backward", "--check"],
                                       environment: ["SEQPAR_RING_PROGRESS": mode])
            #expect(!r.timedOut && r.status == 0 && r.output.contains(": PASS"), "\(mode) \(algorithm): \(r.output)")
        }
    }

    @Test func denseUnderMPIOneRank() throws {
        let r = try Harness.mpirun(1, ["attention", "--algorithm", "dense", "--seq-len", "64", "--heads", "2", "--head-dim", "16",
                                       "--causal", "--backward", "--check"])
        #expect(r.status == 0 && r.output.contains(": PASS"), "\(r.output)")
    }

    /// The issue's acceptance run, smaller: L not divisible by 3, GQA, causal, on both backends; the two backends
    /// give the same bits (the error figures printed agree exactly).
    @Test func sameRunOnBothBackends() throws {
        let args = ["attention", "--algorithm", "allgather", "--seq-len", "301", "--heads", "4", "--kv-heads", "2", "--head-dim", "64",
                    "--causal", "--check", "--json"]
        let mpi = try Harness.mpirun(3, args), sim = try Harness.simulated(args + ["--ranks", "3"])
        #expect(mpi.status == 0 && sim.status == 0, "\(mpi.output)\n\(sim.output)")
        func errorField(_ text: String) -> String? {
            text.range(of: "\"forward_error\":[^,}]*", options: .regularExpression).map { String(text[$0]) }
        }
        #expect(errorField(mpi.output) != nil && errorField(mpi.output) == errorField(sim.output), "\(mpi.output)\n\(sim.output)")
    }

    /// Outputs written with --out are the same file under mpirun and in process.
    @Test func outputFilesAgreeAcrossBackends() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("seqpar-mpi-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let base = ["attention", "--algorithm", "allgather", "--seq-len", "45", "--heads", "2", "--head-dim", "16", "--causal",
                    "--layout", "zigzag", "--backward"]
        let a = try Harness.mpirun(3, base + ["--out", dir.appendingPathComponent("mpi.npy").path, "--grads-prefix", dir.appendingPathComponent("mpi").path])
        let b = try Harness.simulated(base + ["--ranks", "2", "--out", dir.appendingPathComponent("sim.npy").path, "--grads-prefix", dir.appendingPathComponent("sim").path])
        #expect(a.status == 0 && b.status == 0, "\(a.output)\n\(b.output)")
        for suffix in [".npy", ".dq.npy", ".dk.npy", ".dv.npy"] {
            let x = FileManager.default.contents(atPath: dir.appendingPathComponent("mpi" + suffix).path)
            let y = FileManager.default.contents(atPath: dir.appendingPathComponent("sim" + suffix).path)
            #expect(x != nil && x?.count ?? 0 > 128, "missing output \(suffix)")
            // Different rank counts and layouts of the same problem: the reduction order may differ, so compare values.
            if let x, let y {
                let fx = x.dropFirst(128).withUnsafeBytes { Array($0.bindMemory(to: Float.self)) }
                let fy = y.dropFirst(128).withUnsafeBytes { Array($0.bindMemory(to: Float.self)) }
                #expect(fx.count == fy.count && zip(fx, fy).allSatisfy { abs($0 - $1) <= 1e-5 * max(1, abs($0)) }, "\(suffix) differs")
            }
        }
    }

    // MARK: bad input: a non-zero exit, a message that names the problem, on both backends, no hang.

    struct BadInput: Sendable, CustomStringConvertible {
        var arguments: [String]
        var message: String
        var description: String { arguments.joined(separator: " ") }
    }

    static let badInputs: [BadInput] = [
        BadInput(arguments: ["attention", "--algorithm", "allgather", "--heads", "4", "--kv-heads", "3"], message: "does not divide --heads 4"),
        BadInput(arguments: ["attention", "--algorithm", "nope"], message: "algorithm"),
        BadInput(arguments: ["bench", "attention", "--algorithm", "ring", "--no-baseline", "--busy-baseline"],
                 message: "--busy-baseline runs the baseline that --no-baseline skips"),
        BadInput(arguments: ["attention", "--algorithm", "ulysses", "--heads", "4"], message: "3 ranks do not divide --heads 4"),
        BadInput(arguments: ["attention", "--algorithm", "allgather", "--seq-len", "0"], message: "--seq-len 0"),
        BadInput(arguments: ["attention", "--algorithm", "allgather", "--grad-out", "x.npy"], message: "--grad-out needs --backward"),
        BadInput(arguments: ["attention", "--algorithm", "allgather", "--q", "/nonexistent/q.npy", "--k", "/nonexistent/k.npy", "--v", "/nonexistent/v.npy"], message: "no such file"),
        BadInput(arguments: ["attention", "--algorithm", "allgather", "--layout", "diagonal"], message: "layout"),
        BadInput(arguments: ["attention", "--algorithm", "allgather", "--out", "/nonexistent-dir/o.npy"], message: "does not exist"),
        BadInput(arguments: ["attention", "--algorithm", "lasp2", "--decay", "1.5"], message: "--decay 1.5 is outside (0, 1]"),
        BadInput(arguments: ["attention", "--algorithm", "lasp2", "--decay", "0.9,0.8", "--heads", "4"], message: "2 values for 4 heads"),
        BadInput(arguments: ["attention", "--algorithm", "lasp2", "--decay", "0.9,x"], message: "--decay '0.9,x'"),
        BadInput(arguments: ["attention", "--algorithm", "lasp1", "--layout", "zigzag"], message: "needs --layout contiguous"),
        BadInput(arguments: ["attention", "--algorithm", "lasp2", "--bidirectional", "--decay", "0.9"], message: "--decay needs causal"),
        BadInput(arguments: ["attention", "--algorithm", "ring", "--decay", "0.9"], message: "apply to linear attention"),
        BadInput(arguments: ["attention", "--algorithm", "lasp2", "--scale", "0.5"], message: "no softmax scale"),
        BadInput(arguments: ["attention", "--algorithm", "lasp2h", "--layers", "LLX"], message: "'X' is not a layer"),
        BadInput(arguments: ["attention", "--algorithm", "tpla", "--latent-dim", "64"], message: "3 ranks do not divide --latent-dim 64"),
        BadInput(arguments: ["attention", "--algorithm", "tpla", "--latent-dim", "96", "--transform", "hadamard"], message: "power of two"),
        BadInput(arguments: ["attention", "--algorithm", "tp-mla", "--heads", "8"], message: "3 ranks do not divide --heads 8"),
        BadInput(arguments: ["attention", "--algorithm", "mla"], message: "single-rank reference"),
        BadInput(arguments: ["decode", "--rope-dim", "7"], message: "must be even"),
        BadInput(arguments: ["decode", "--latent-dim", "100"], message: "3 ranks do not divide --latent-dim 100"),
        BadInput(arguments: ["attention", "--algorithm", "tpla", "--causal"], message: "do not apply to latent attention"),
        BadInput(arguments: ["attention", "--algorithm", "ring", "--latent-dim", "64"], message: "apply to latent attention"),
        BadInput(arguments: ["attention", "--algorithm", "lasp2h"], message: "needs --layers"),
        BadInput(arguments: ["attention", "--algorithm", "lasp2h", "--layers", "LS", "--decay", "2"], message: "--decay 2.0 is outside (0, 1]"),
        // Impossible memory: refused before allocating, with the estimate and what would fit.
        BadInput(arguments: ["attention", "--algorithm", "allgather", "--seq-len", "50000000", "--heads", "32", "--head-dim", "128"], message: "use at most about --seq-len"),
        BadInput(arguments: ["attention", "--algorithm", "rsa", "--seq-len", "400000"], message: "score rows B*H*C*L (kept for backward)"),
        BadInput(arguments: ["attention", "--algorithm", "ring", "--seq-len", "300000000"], message: "use at most about --seq-len"),
        BadInput(arguments: ["attention", "--algorithm", "lasp2", "--seq-len", "300000000"], message: "use at most about --seq-len"),
        BadInput(arguments: ["attention", "--algorithm", "tpla", "--seq-len", "300000000", "--latent-dim", "96"], message: "the latent run needs about"),
        BadInput(arguments: ["decode", "--prompt-len", "300000000", "--latent-dim", "96"], message: "use a shorter --prompt-len or more machines"),
        // kv heads that do not divide heads, for every algorithm that takes them.
        BadInput(arguments: ["attention", "--algorithm", "ring", "--heads", "4", "--kv-heads", "3"], message: "--kv-heads 3 does not divide --heads 4"),
        BadInput(arguments: ["attention", "--algorithm", "rsa", "--heads", "4", "--kv-heads", "3"], message: "--kv-heads 3 does not divide --heads 4"),
        BadInput(arguments: ["attention", "--algorithm", "ulysses", "--heads", "6", "--kv-heads", "4"], message: "--kv-heads 4 does not divide --heads 6"),
        BadInput(arguments: ["attention", "--algorithm", "lasp1", "--heads", "4", "--kv-heads", "3"], message: "--kv-heads 3 does not divide --heads 4"),
        BadInput(arguments: ["attention", "--algorithm", "lasp2", "--heads", "4", "--kv-heads", "3"], message: "--kv-heads 3 does not divide --heads 4"),
        BadInput(arguments: ["attention", "--algorithm", "lasp2h", "--layers", "LS", "--heads", "4", "--kv-heads", "3"], message: "--kv-heads 3 does not divide --heads 4"),
        // Ulysses: P divides H, but a rank's heads would straddle kv heads.
        BadInput(arguments: ["attention", "--algorithm", "ulysses", "--heads", "6", "--kv-heads", "2"], message: "those straddle kv heads"),
        // Decay at and beyond the edges of (0, 1], and not a number.
        BadInput(arguments: ["attention", "--algorithm", "lasp1", "--decay", "0"], message: "--decay 0.0 is outside (0, 1]"),
        BadInput(arguments: ["attention", "--algorithm", "lasp2", "--decay=-0.5"], message: "--decay -0.5 is outside (0, 1]"),
        BadInput(arguments: ["attention", "--algorithm", "lasp2", "--decay", "nan"], message: "--decay nan is outside (0, 1]"),
        BadInput(arguments: ["attention", "--algorithm", "lasp2", "--heads", "2", "--decay", "0.9,inf"], message: "--decay inf is outside (0, 1]"),
        BadInput(arguments: ["attention", "--algorithm", "ring", "--head-dim", "0"], message: "--head-dim 0: must be at least 1"),
        BadInput(arguments: ["attention", "--algorithm", "ring", "--timeout", "0"], message: "--timeout must be a positive number of seconds"),
        BadInput(arguments: ["decode", "--steps", "0"], message: "--steps is 0"),
        // Packed documents that do not fit the sequence, or are not a list.
        BadInput(arguments: ["attention", "--algorithm", "ring", "--seq-len", "100", "--doc-lens", "50,60"], message: "--doc-lens 50,60 sums to 110, the sequence length is 100"),
        BadInput(arguments: ["attention", "--algorithm", "ring", "--seq-len", "100", "--doc-lens", "50,0,50"], message: "document 1 has length 0"),
        BadInput(arguments: ["attention", "--algorithm", "ring", "--seq-len", "100", "--doc-lens", "50,-5,55"], message: "document 1 has length -5"),
        BadInput(arguments: ["attention", "--algorithm", "ring", "--doc-lens", "50,x"], message: "give the documents' lengths as whole numbers"),
        BadInput(arguments: ["attention", "--algorithm", "tpla", "--doc-lens", "512,512"], message: "do not apply to latent attention"),
        // USP degrees that do not fit 3 ranks or the heads, and the degree without usp.
        BadInput(arguments: ["attention", "--algorithm", "usp", "--ulysses-degree", "2"], message: "--ulysses-degree 2 must divide the 3 ranks"),
        BadInput(arguments: ["attention", "--algorithm", "usp", "--ulysses-degree", "3", "--heads", "4"], message: "degrees that work with 3 ranks"),
        BadInput(arguments: ["attention", "--algorithm", "usp"], message: "--algorithm usp needs --ulysses-degree"),
        BadInput(arguments: ["attention", "--algorithm", "ring", "--ulysses-degree", "3"], message: "sets the Ulysses groups of --algorithm usp"),
    ]

    @Test(arguments: badInputs) func badOptionsFailClearlyUnderMPI(_ bad: BadInput) throws {
        let r = try Harness.mpirun(3, bad.arguments, timeout: 60)
        #expect(!r.timedOut && r.status != 0, "\(r.output)")
        #expect(r.output.contains(bad.message), "expected '\(bad.message)' in: \(r.output)")
        let s = try Harness.simulated(bad.arguments + ["--ranks", "3"], timeout: 60)
        #expect(!s.timedOut && s.status != 0 && s.output.contains(bad.message), "\(s.output)")
    }

    @Test func denseOnSeveralRanksIsRefusedOnEveryRank() throws {
        let r = try Harness.mpirun(3, ["attention", "--algorithm", "dense", "--seq-len", "30"], timeout: 60)
        #expect(!r.timedOut && r.status != 0, "\(r.output)")
        for rank in 0..<3 { #expect(r.output.contains("(rank \(rank) of 3)") && r.output.contains("on one rank"), "\(r.output)") }
    }

    @Test func ranksOptionUnderMPIIsRefused() throws {
        let r = try Harness.mpirun(2, ["attention", "--algorithm", "allgather", "--ranks", "4"], timeout: 60)
        #expect(!r.timedOut && r.status != 0 && r.output.contains("drop --ranks"), "\(r.output)")
    }

    /// Malformed files: each provoked under mpirun -np 3 and in process.
    @Test func badFilesFailClearly() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("seqpar-bad-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        func npy(_ name: String, descr: String = "<f4", fortran: Bool = false, shape: [Int], values: [Float], truncate: Int = 0) -> String {
            var header = "{'descr': '\(descr)', 'fortran_order': \(fortran ? "True" : "False"), 'shape': (\(shape.map(String.init).joined(separator: ", "))\(shape.count == 1 ? "," : "")), }"
            header += String(repeating: " ", count: (64 - (10 + header.utf8.count + 1) % 64) % 64) + "\n"
            var bytes: [UInt8] = [0x93, 0x4E, 0x55, 0x4D, 0x50, 0x59, 1, 0, UInt8(header.utf8.count & 0xFF), UInt8(header.utf8.count >> 8)]
            bytes += Array(header.utf8)
            for v in values { withUnsafeBytes(of: v.bitPattern.littleEndian) { bytes += $0 } }
            bytes.removeLast(truncate)
            let path = dir.appendingPathComponent(name).path
            #expect(FileManager.default.createFile(atPath: path, contents: Data(bytes)))
            return path
        }
        let shape = [6, 2, 4], n = 48
        let good = (0..<n).map { Float($0 % 7) * 0.1 }
        var withNaN = good
        withNaN[4 * 8 + 1 * 4 + 2] = .nan  // token 4, head 1, dim 2
        let k = npy("k.npy", shape: shape, values: good), v = npy("v.npy", shape: shape, values: good)
        var withInf = good
        withInf[5 * 8 + 0 * 4 + 3] = -.infinity  // token 5, head 0, dim 3
        let fifo = dir.appendingPathComponent("fifo.npy").path
        #expect(mkfifo(fifo, 0o600) == 0)
        let garbage = dir.appendingPathComponent("garbage.npy").path
        #expect(FileManager.default.createFile(atPath: garbage, contents: Data((0..<300).map { UInt8(truncatingIfNeeded: $0 &* 131 &+ 7) })))
        let cases: [(q: String, k: String?, v: String?, message: String)] = [
            (npy("nan.npy", shape: shape, values: withNaN), nil, nil, "holds nan at (batch, token, head, dim) [0, 4, 1, 2]"),
            (npy("q.npy", shape: shape, values: good), nil, npy("inf.npy", shape: shape, values: withInf), "holds -inf at (batch, token, head, dim) [0, 5, 0, 3]"),
            (npy("trunc.npy", shape: shape, values: good, truncate: 10), nil, nil, "truncated"),
            (npy("fortran.npy", fortran: true, shape: shape, values: good), nil, nil, "Fortran-order"),
            (npy("int.npy", descr: "<i4", shape: shape, values: good), nil, nil, "dtype '<i4' is not supported"),
            (npy("half.npy", descr: "<f2", shape: [6, 2, 2], values: good), nil, nil, "dtype '<f2' is not supported"),
            (npy("big.npy", descr: ">f4", shape: shape, values: good), nil, nil, "big-endian"),
            (garbage, nil, nil, "not a .npy file"),
            (fifo, nil, nil, "not a regular file"),
            (npy("short.npy", shape: [5, 2, 4], values: Array(good.prefix(40))), nil, nil, "disagree"),
            (npy("q.npy", shape: shape, values: good), nil, npy("v3.npy", shape: [6, 3, 4], values: good + good.prefix(24)), "must have the same shape"),
            (npy("rank2.npy", shape: [6, 8], values: good), nil, nil, "expected (seq, heads, head_dim)"),
        ]
        for c in cases {
            let args = ["attention", "--algorithm", "allgather", "--q", c.q, "--k", c.k ?? k, "--v", c.v ?? v]
            let r = try Harness.mpirun(3, args, timeout: 60)
            #expect(!r.timedOut && r.status != 0 && r.output.contains(c.message), "mpirun, \(c.q): \(r.output)")
            let s = try Harness.simulated(args + ["--ranks", "3"], timeout: 60)
            #expect(!s.timedOut && s.status != 0 && s.output.contains(c.message), "in process, \(c.q): \(s.output)")
        }
        // A good set of files passes the check, under MPI.
        let ok = try Harness.mpirun(3, ["attention", "--algorithm", "allgather", "--q", npy("q.npy", shape: shape, values: good.reversed()),
                                        "--k", k, "--v", v, "--causal", "--check"], timeout: 60)
        #expect(ok.status == 0 && ok.output.contains(": PASS"), "\(ok.output)")
    }

    @Test func infoReportsTheLaunch() throws {
        let r = try Harness.mpirun(2, ["info"], timeout: 60)
        #expect(r.status == 0 && r.output.contains("backend: MPI") && r.output.contains("ranks: 2 on 1 host(s)"), "\(r.output)")
        #expect(r.output.contains("blas: OpenBLAS, core type"), "\(r.output)")
    }
}
