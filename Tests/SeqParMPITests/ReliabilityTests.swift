// Faults under a real `mpirun -np 3`: a rank that hangs (the watchdog, --timeout), a rank that dies (SIGKILL from
// the fault hook and from outside), and re-runs that must give the same bits. Every case asserts the exit status,
// the message, how long until the job ended, and that no process of the launch is left.
import Foundation
import Testing

@Suite(.serialized) struct ReliabilityTests {
    static let ring = ["attention", "--algorithm", "ring", "--seq-len", "301", "--heads", "4", "--kv-heads", "2", "--head-dim", "32",
                       "--causal", "--layout", "zigzag", "--backward", "--check"]

    struct Stall: Sendable, CustomStringConvertible {
        /// Communication calls rank 1 makes before it stalls.
        var after: Int
        var progress: String
        /// What a waiting rank must name (a regular expression: which waiting rank prints first is a race, and
        /// MPI_Abort may end the others before they print).
        var waitedOn: String
        var description: String { "stall after \(after) calls, \(progress) progress" }
    }

    /// Call 1 is the first agreement (an all-reduce); calls 6-9 are the forward ring's exchanges; on the backward,
    /// 11-14 its K/V exchanges and 15 the first dK/dV accumulator's (after the second step's kernel).
    static let stalls: [Stall] = [
        Stall(after: 0, progress: "tests", waitedOn: #"waiting for the other ranks in MPI_Allreduce \(all 3 ranks"#),
        Stall(after: 5, progress: "tests", waitedOn: #"waiting for (a message from rank 1|rank 1 to take a message) \(tag 300, "#),
        Stall(after: 14, progress: "thread", waitedOn: #"waiting for (a message from rank 1|rank 1 to take a message) \(tag 301, "#),
    ]

    /// Rank 1 stops before one of its communication calls and never returns: the ranks waiting on it time out after
    /// --timeout 5, say which rank waited on what, and abort the job; everything ends within a few seconds more.
    @Test(arguments: stalls) func stalledRankTimesOut(_ stall: Stall) throws {
        let tag = Harness.uniqueTag()
        let r = try Harness.mpirun(3, Self.ring + ["--timeout", "5"], timeout: 60,
                                   environment: ["SEQPAR_FAULT": "stall:rank=1:after=\(stall.after)", "SEQPAR_TEST_TAG": tag,
                                                 "SEQPAR_RING_PROGRESS": stall.progress])
        #expect(!r.timedOut && r.status != 0, "\(r.output)")
        #expect(r.output.contains("rank 1: SEQPAR_FAULT: stalling before communication call \(stall.after + 1)"), "\(r.output)")
        #expect(r.output.range(of: stall.waitedOn, options: .regularExpression) != nil, "expected /\(stall.waitedOn)/ in: \(r.output)")
        #expect(r.output.range(of: #"seqpar: rank [02]: timed out after 5 s waiting for .* \(--timeout 5\): a rank may have died or hung"#,
                               options: .regularExpression) != nil, "\(r.output)")
        // (Not asserted: mpirun's own "MPI_ABORT was invoked" notice, which it garbles when two ranks abort at once.)
        #expect(r.seconds > 5 && r.seconds < 5 + 8, "ended after \(r.seconds) s")
        #expect(Harness.processes(tagged: tag).isEmpty, "processes left: \(Harness.processes(tagged: tag))")
    }

    /// A stall of rank 1 inside a sub-communicator of `seqpar selftest`.
    struct SubStall: Sendable, CustomStringConvertible {
        var after: Int
        /// The routine rank 1 stalls before.
        var routine: String
        /// What rank 0, the only one waiting, must print (a regular expression).
        var waitedOn: String
        var description: String { "stall before \(routine), call \(after + 1)" }
    }

    /// Under `mpirun -np 2 seqpar selftest`, rank 1's calls 35 and 38 are the first all-reduce and the sendRecv ring
    /// inside the rows sub-communicator (color 0, keys reversed: world ranks [1, 0]), after 33 calls of the checks
    /// before it and the split (call 34). The stall message names the routine, so a change to the checks that moves
    /// these calls fails here rather than testing something else.
    static let subStalls: [SubStall] = [
        SubStall(after: 34, routine: "MPI_Allreduce",
                 waitedOn: #"rank 0: timed out after 5 s waiting for the other ranks in MPI_Allreduce \(all 2 ranks of the sub-communicator of color 0, world ranks \[1, 0\]; 16 bytes"#),
        SubStall(after: 37, routine: "MPI_Sendrecv",
                 waitedOn: #"rank 0: timed out after 5 s waiting for a message from rank 1 \(rank 0 of the sub-communicator of color 0, world ranks \[1, 0\]; tag 105, "#),
    ]

    /// A rank that hangs inside a sub-communicator's collective or ring: the rank waiting on it in the
    /// sub-communicator times out, names the sub-communicator and its peer by world rank, and aborts the whole job.
    @Test(arguments: subStalls) func stalledRankInASubCommunicatorTimesOut(_ stall: SubStall) throws {
        let tag = Harness.uniqueTag()
        let r = try Harness.mpirun(2, ["selftest", "--timeout", "5"], timeout: 60,
                                   environment: ["SEQPAR_FAULT": "stall:rank=1:after=\(stall.after)", "SEQPAR_TEST_TAG": tag])
        #expect(!r.timedOut && r.status != 0, "\(r.output)")
        #expect(r.output.contains("rank 1: SEQPAR_FAULT: stalling before communication call \(stall.after + 1) (\(stall.routine))"), "\(r.output)")
        #expect(r.output.range(of: stall.waitedOn, options: .regularExpression) != nil, "expected /\(stall.waitedOn)/ in: \(r.output)")
        #expect(r.seconds > 5 && r.seconds < 5 + 8, "ended after \(r.seconds) s")
        #expect(Harness.processes(tagged: tag).isEmpty, "processes left: \(Harness.processes(tagged: tag))")
    }

    /// Rank 1 sends itself SIGKILL after its first ring exchange (forward) or in the backward pass: mpirun sees a
    /// rank die and ends the job within 10 s, naming the rank and the signal.
    @Test(arguments: [7, 13]) func killedRankEndsTheJob(after: Int) throws {
        let tag = Harness.uniqueTag()
        let r = try Harness.mpirun(3, Self.ring + ["--timeout", "60"], timeout: 60,
                                   environment: ["SEQPAR_FAULT": "kill:rank=1:after=\(after)", "SEQPAR_TEST_TAG": tag])
        #expect(!r.timedOut && r.status != 0, "\(r.output)")
        #expect(r.output.contains("rank 1: SEQPAR_FAULT: killing this process before communication call \(after + 1)"), "\(r.output)")
        #expect(r.output.range(of: #"process rank 1 with PID [0-9]+ on node \S+ exited on signal 9"#, options: .regularExpression) != nil, "\(r.output)")
        #expect(r.seconds < 10, "ended after \(r.seconds) s")
        #expect(Harness.processes(tagged: tag).isEmpty, "processes left: \(Harness.processes(tagged: tag))")
    }

    /// SIGKILL from outside, to rank 1 of a running benchmark (ring attention, repeated): the job ends within 10 s of
    /// the kill with mpirun naming rank 1, and no process of the launch is left.
    @Test func rankKilledFromOutsideEndsTheJob() throws {
        let tag = Harness.uniqueTag()
        let r = try Harness.mpirun(3, ["bench", "attention", "--algorithm", "ring", "--seq-len", "1200", "--heads", "2", "--head-dim", "32",
                                       "--repeats", "100000", "--timeout", "60"], timeout: 90,
                                   environment: ["SEQPAR_TEST_TAG": tag, "OPENBLAS_NUM_THREADS": "1"],
                                   during: (after: 3, action: {
                                       guard let pid = Harness.processes(tagged: tag, rank: 1).first else { return false }
                                       return kill(pid, SIGKILL) == 0
                                   }))
        #expect(!r.timedOut && r.status != 0, "\(r.output)")
        let killedAt = try #require(r.actionAt, "rank 1 was never found: \(r.output)")
        #expect(r.output.range(of: #"process rank 1 with PID [0-9]+ on node \S+ exited on signal 9"#, options: .regularExpression) != nil, "\(r.output)")
        #expect(r.seconds - killedAt < 10, "ended \(r.seconds - killedAt) s after the kill")
        #expect(Harness.processes(tagged: tag).isEmpty, "processes left: \(Harness.processes(tagged: tag))")
    }

    /// A fault spec that does not parse is refused (a test that meant to inject a fault must not pass without it).
    @Test func badFaultSpecIsRefused() throws {
        let r = try Harness.mpirun(2, ["selftest"], timeout: 60, environment: ["SEQPAR_FAULT": "explode:rank=1"])
        #expect(!r.timedOut && r.status != 0 && r.output.contains("SEQPAR_FAULT=explode:rank=1: give stall:rank=R"), "\(r.output)")
    }

    /// Ranks started with different options (an MPMD launch: rank 0 with one command line, ranks 1-2 with another):
    /// the agreement at the start stops every rank, naming rank 1 and each differing option, before any work.
    @Test func ranksThatDisagreeStopTogether() throws {
        let tag = Harness.uniqueTag()
        let common = ["attention", "--algorithm", "ring", "--heads", "2", "--head-dim", "16"]
        let r = try Harness.run(["mpirun", "-x", "SEQPAR_TEST_TAG", "-np", "1", Harness.binary] + common + ["--seq-len", "100", "--seed", "1", ":",
                                 "-np", "2", Harness.binary] + common + ["--seq-len", "101", "--seed", "2", "--causal"],
                                timeout: 60, environment: ["SEQPAR_TEST_TAG": tag])
        #expect(!r.timedOut && r.status != 0, "\(r.output)")
        for rank in 0..<3 {
            #expect(r.output.contains("seqpar: error: (rank \(rank) of 3) rank 1: ranks disagree on the run's configuration"), "\(r.output)")
        }
        for field in ["\"seqLen\": 100", "\"seqLen\": 101", "\"causal\": 0", "\"causal\": 1", "seed: rank 0 has 1, rank 1 has 2"] {
            #expect(r.output.contains(field), "expected \(field) in: \(r.output)")
        }
        #expect(r.seconds < 10, "ended after \(r.seconds) s")
        #expect(Harness.processes(tagged: tag).isEmpty)
    }

    /// One token over 3 ranks (two hold none), forward and backward: dQ and dK are exactly zero, and the check passes.
    @Test func oneTokenOverThreeRanks() throws {
        for algorithm in ["allgather", "ring", "rsa", "lasp2"] {
            let r = try Harness.mpirun(3, ["attention", "--algorithm", algorithm, "--seq-len", "1", "--heads", "2", "--head-dim", "8", "--backward", "--check"],
                                       timeout: 60)
            #expect(!r.timedOut && r.status == 0 && r.output.contains(": PASS"), "\(algorithm): \(r.output)")
        }
    }

    // MARK: determinism

    struct Rerun: Sendable, CustomStringConvertible {
        var arguments: [String]
        /// Outputs summed across ranks in floating point by an MPI collective (allgather's dK and dV, a ReduceScatter):
        /// MPI's reduction algorithm fixes its own summation order, so these agree with the in-process backend (which
        /// adds in rank order) to rounding, not bit for bit. Re-runs on one backend are still bit-identical.
        var reducedByMPI: Set<String> = []
        var description: String { arguments.joined(separator: " ") }
    }

    static let reruns: [Rerun] = [
        Rerun(arguments: ["--algorithm", "allgather", "--causal", "--layout", "zigzag"], reducedByMPI: [".dk", ".dv"]),
        Rerun(arguments: ["--algorithm", "ring", "--causal", "--layout", "zigzag"]),
        Rerun(arguments: ["--algorithm", "rsa", "--causal"]),
        Rerun(arguments: ["--algorithm", "ulysses", "--heads", "6", "--kv-heads", "3"]),
        Rerun(arguments: ["--algorithm", "lasp1", "--decay", "0.95"]),
        Rerun(arguments: ["--algorithm", "lasp2", "--decay", "0.95"]),
    ]

    /// The same run twice under mpirun -np 3 writes the same bytes (the output and every gradient), for every
    /// distributed algorithm; so do two runs on the in-process backend with 3 ranks; and the two backends write the
    /// same bytes too, except where MPI reduces floats across ranks (then within 1e-6 of the largest magnitude).
    @Test(arguments: reruns) func rerunsGiveTheSameBits(_ rerun: Rerun) throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("seqpar-bits-\(Harness.uniqueTag())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        var base = ["attention", "--seq-len", "203", "--head-dim", "32", "--backward"] + rerun.arguments
        if !rerun.arguments.contains("--heads") { base += ["--heads", "4", "--kv-heads", "2"] }
        let suffixes = ["", ".dq", ".dk", ".dv"]
        func path(_ name: String, _ suffix: String) -> String { dir.appendingPathComponent(name + suffix + ".npy").path }
        func outputs(_ name: String) -> [String] { ["--out", path(name, ""), "--grads-prefix", dir.appendingPathComponent(name).path] }
        let runs = [try Harness.mpirun(3, base + outputs("mpi1")), try Harness.mpirun(3, base + outputs("mpi2")),
                    try Harness.simulated(base + outputs("sim1") + ["--ranks", "3"]), try Harness.simulated(base + outputs("sim2") + ["--ranks", "3"])]
        for r in runs { #expect(!r.timedOut && r.status == 0, "\(r.output)") }
        func floats(_ data: Data?) -> [Float] { data.map { $0.dropFirst(128).withUnsafeBytes { Array($0.bindMemory(to: Float.self)) } } ?? [] }
        for suffix in suffixes {
            let mpi = FileManager.default.contents(atPath: path("mpi1", suffix)), sim = FileManager.default.contents(atPath: path("sim1", suffix))
            #expect(mpi != nil && mpi!.count > 128 && sim != nil, "\(suffix): missing output")
            #expect(mpi == FileManager.default.contents(atPath: path("mpi2", suffix)), "\(suffix): a re-run under mpirun changed the bits")
            #expect(sim == FileManager.default.contents(atPath: path("sim2", suffix)), "\(suffix): a re-run in process changed the bits")
            if rerun.reducedByMPI.contains(suffix) {
                let (a, b) = (floats(mpi), floats(sim))
                let scale = a.map(abs).max() ?? 1
                #expect(a.count == b.count && zip(a, b).allSatisfy { abs($0 - $1) <= 1e-6 * scale }, "\(suffix): the backends differ beyond rounding")
            } else {
                #expect(mpi == sim, "\(suffix): the in-process backend wrote other bits than mpirun")
            }
        }
    }
}
