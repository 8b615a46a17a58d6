// The built seqpar across three "hosts" (Linux network namespaces joined by veth pairs to a bridge, from
// launch/netns-hosts), OpenMPI over TCP only: ring attention and LASP-2 pass --check across the hosts, and a cut link,
// a killed host and a killed rank each end the job with a clear error within the time limit, leaving no process.
// Skipped, with the reason printed, where this machine does not allow network namespaces (not root, a sandbox).
import Foundation
import Testing

enum NetnsHosts {
    static let script = Harness.root.appendingPathComponent("launch/netns-hosts").path
    /// Names of this test process's namespaces and hosts (PREFIX-h1 ...): unique, so concurrent runs do not collide.
    static let prefix = "sp\(getpid())"

    /// nil where namespaces can be created here; otherwise why not (printed once).
    static let unavailable: String? = {
        guard let r = try? Harness.run([script, "check", "--prefix", prefix], timeout: 60) else { return "launch/netns-hosts did not run" }
        if r.status == 0 { return nil }
        print("MultiHostTests skipped: \(r.output.trimmingCharacters(in: .whitespacesAndNewlines))")
        return r.output
    }()

    static func command(_ arguments: [String], timeout: Double = 60) throws -> Run {
        try Harness.run([script] + arguments + ["--prefix", prefix], timeout: timeout)
    }

    /// `netns-hosts run` of the seqpar binary across `hosts` hosts, one rank each.
    static func run(_ arguments: [String], hosts: Int = 3, setup: Bool = true, timeout: Double = 180,
                    during: (after: Double, action: () -> Bool)? = nil) throws -> Run {
        try Harness.run([script, "run", "-n", "\(hosts)", "--prefix", prefix] + (setup ? [] : ["--no-setup"]) + ["--", Harness.binary] + arguments,
                        timeout: timeout, environment: ["OPENBLAS_NUM_THREADS": "1"], during: during)
    }

    /// Processes inside host `host`'s namespace (pid, command name).
    static func processes(on host: Int) -> [(pid: Int32, name: String)] {
        let out = (try? Harness.run(["ip", "netns", "pids", "\(prefix)-h\(host)"], timeout: 30))?.output ?? ""
        return out.split(separator: "\n").compactMap { Int32($0.trimmingCharacters(in: .whitespaces)) }.map { pid in
            (pid, ((try? String(contentsOfFile: "/proc/\(pid)/comm", encoding: .utf8)) ?? "").trimmingCharacters(in: .whitespacesAndNewlines))
        }
    }

    /// Waits up to `seconds` for every host's namespace to hold no process; returns what is left.
    static func leftovers(hosts: Int = 3, within seconds: Double = 5) -> [String] {
        let deadline = Date(timeIntervalSinceNow: seconds)
        while true {
            let left = (1...hosts).flatMap { h in processes(on: h).map { "\(prefix)-h\(h): \($0.name) (\($0.pid))" } }
            if left.isEmpty || Date() > deadline { return left }
            Thread.sleep(forTimeInterval: 0.2)
        }
    }
}

@Suite(.serialized, .enabled(if: NetnsHosts.unavailable == nil, "needs root and network namespaces: see launch/netns-hosts check"))
struct MultiHostTests {
    init() {
        precondition(FileManager.default.isExecutableFile(atPath: Harness.binary), "seqpar binary not found at \(Harness.binary): run `swift build` first")
    }

    /// Three hosts, one rank each, every message over TCP: the launch sees three hosts, and ring attention (zigzag,
    /// causal, forward and backward) and LASP-2 (decay 0.95, forward and backward) pass --check.
    @Test func ringAndLASP2PassAcrossHosts() throws {
        defer { _ = try? NetnsHosts.command(["down"]) }
        let info = try NetnsHosts.run(["info"], timeout: 60)
        #expect(info.status == 0 && info.output.contains("ranks: 3 on 3 host(s): \(NetnsHosts.prefix)-h1 (1), \(NetnsHosts.prefix)-h2 (1), \(NetnsHosts.prefix)-h3 (1)"),
                "\(info.output)")
        for arguments in [["--algorithm", "ring", "--layout", "zigzag", "--causal", "--backward", "--seq-len", "1001", "--heads", "4", "--kv-heads", "2"],
                          ["--algorithm", "lasp2", "--decay", "0.95", "--backward", "--seq-len", "1001", "--heads", "4"]] {
            let r = try NetnsHosts.run(["attention", "--head-dim", "32", "--check", "--timeout", "60"] + arguments)
            #expect(!r.timedOut && r.status == 0 && r.output.contains(": PASS"), "\(arguments): \(r.output)")
            #expect(r.output.contains("\(NetnsHosts.prefix)-h3"), "the report names the hosts: \(r.output)")
        }
        let down = try NetnsHosts.command(["down"])
        #expect(down.status == 0, "\(down.output)")
        let hosts = (try? String(contentsOfFile: "/etc/hosts", encoding: .utf8)) ?? ""
        #expect(!hosts.contains("netns-hosts \(NetnsHosts.prefix)"), "/etc/hosts keeps lines of the test: \(hosts)")
    }

    /// USP across two hosts of two ranks each (mpirun fills a host's slots in rank order, so each Ulysses group of 2 is
    /// one host): passes --check with documents, every group on one host, and fewer bytes cross between the hosts than
    /// with ring attention (and Ulysses) on the same problem; a degree whose groups span hosts gets the placement note.
    @Test func uspKeepsUlyssesGroupsOnAHost() throws {
        defer { _ = try? NetnsHosts.command(["down"]) }
        let up = try NetnsHosts.command(["up", "-n", "2"])
        #expect(up.status == 0, "\(up.output)")
        func run(_ arguments: [String]) throws -> Run {
            try Harness.run([NetnsHosts.script, "run", "-n", "2", "--np", "4", "--prefix", NetnsHosts.prefix, "--no-setup", "--", Harness.binary,
                             "attention", "--layout", "zigzag", "--causal", "--backward", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
                             "--timeout", "60"] + arguments, timeout: 180, environment: ["OPENBLAS_NUM_THREADS": "1"])
        }
        let checked = try run(["--algorithm", "usp", "--ulysses-degree", "2", "--seq-len", "301", "--doc-lens", "100,1,200", "--check"])
        #expect(!checked.timedOut && checked.status == 0 && checked.output.contains(": PASS"), "\(checked.output)")
        #expect(!checked.output.contains("spans hosts"), "\(checked.output)")
        /// The report's bytes across hosts, forward and backward, and each rank's host.
        func crossHost(_ algorithm: [String]) throws -> (bytes: Int, hosts: [String]) {
            let r = try run(algorithm + ["--seq-len", "512", "--json"])
            let line = r.output.split(separator: "\n").last { $0.hasPrefix("{") }.map(String.init) ?? ""
            let json = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] ?? [:]
            let hosts = (json["per_rank"] as? [[String: Any]] ?? []).compactMap { $0["host"] as? String }
            return ((json["cross_host_bytes_forward"] as? Int ?? -1) + (json["cross_host_bytes_backward"] as? Int ?? -1), hosts)
        }
        let usp = try crossHost(["--algorithm", "usp", "--ulysses-degree", "2"])
        let ring = try crossHost(["--algorithm", "ring"]), ulysses = try crossHost(["--algorithm", "ulysses"])
        #expect(usp.hosts.count == 4 && usp.hosts[0] == usp.hosts[1] && usp.hosts[2] == usp.hosts[3] && usp.hosts[0] != usp.hosts[2], "\(usp.hosts)")
        #expect(usp.bytes > 0 && usp.bytes < ring.bytes && usp.bytes < ulysses.bytes, "usp \(usp.bytes), ring \(ring.bytes), ulysses \(ulysses.bytes)")
        let spanning = try run(["--algorithm", "usp", "--ulysses-degree", "4", "--seq-len", "128"])
        #expect(spanning.status == 0 && spanning.output.contains("Ulysses group 0 (ranks 0-3) spans hosts"), "\(spanning.output)")
    }

    /// The rank on host 2 stops communicating (SEQPAR_FAULT) in the forward ring: the ranks on hosts 1 and 3 time out
    /// after --timeout 5, naming what they waited for, and the abort reaches every host.
    @Test func stalledRankAcrossHostsTimesOut() throws {
        defer { _ = try? NetnsHosts.command(["down"]) }
        let up = try NetnsHosts.command(["up", "-n", "3"])
        #expect(up.status == 0, "\(up.output)")
        let r = try Harness.run([NetnsHosts.script, "run", "-n", "3", "--prefix", NetnsHosts.prefix, "--no-setup", "--", "-x", "SEQPAR_FAULT",
                                 Harness.binary, "attention", "--algorithm", "ring", "--seq-len", "301", "--heads", "4", "--head-dim", "32",
                                 "--timeout", "5"], timeout: 90, environment: ["SEQPAR_FAULT": "stall:rank=1:after=5", "OPENBLAS_NUM_THREADS": "1"])
        #expect(!r.timedOut && r.status != 0, "\(r.output)")
        #expect(r.output.contains("rank 1: SEQPAR_FAULT: stalling"), "\(r.output)")
        #expect(r.output.range(of: #"seqpar: rank [02]: timed out after 5 s waiting for (a message from rank 1|rank 1 to take a message)"#,
                               options: .regularExpression) != nil, "\(r.output)")
        #expect(r.seconds > 5 && r.seconds < 5 + 10, "ended after \(r.seconds) s")
        let left = NetnsHosts.leftovers()
        #expect(left.isEmpty, "processes left after the job ended: \(left)")
    }

    struct Fault: Sendable, CustomStringConvertible {
        var name: String
        /// Seconds the job may take to end after the fault.
        var bound: Double
        /// One of these must appear in the output.
        var messages: [String]
        var description: String { name }
    }

    static let faults: [Fault] = [
        // Every link of host 2 goes down: its daemon's connection stops answering keepalives (mpirun's daemon lost)
        // or the ranks waiting on rank 1 reach --timeout 10 (the watchdog), whichever comes first.
        Fault(name: "cut", bound: 10 + 5, messages: ["ORTE has lost communication with a remote daemon", "timed out after 10 s waiting for"]),
        // Host 2's daemon and rank killed (a host that crashed): mpirun loses the daemon and names its host.
        Fault(name: "kill-host", bound: 10, messages: ["ORTE has lost communication with a remote daemon"]),
        // Only the rank on host 3: mpirun names the rank, its host and the signal.
        Fault(name: "kill-rank", bound: 10, messages: ["process rank 2 with PID"]),
    ]

    /// Ring attention repeated across three hosts, then at 4 s a fault: the job ends non-zero within the bound, the
    /// message names what was lost, and every process on every host has exited by itself (checked before teardown).
    @Test(arguments: faults) func faultEndsTheJob(_ fault: Fault) throws {
        defer { _ = try? NetnsHosts.command(["down"]) }
        let up = try NetnsHosts.command(["up", "-n", "3"])
        #expect(up.status == 0, "\(up.output)")
        let r = try NetnsHosts.run(["bench", "attention", "--algorithm", "ring", "--seq-len", "1200", "--heads", "2", "--head-dim", "32",
                                    "--repeats", "100000", "--warmup", "0", "--timeout", "10"], setup: false, timeout: 90,
                                   during: (after: 4, action: {
                                       switch fault.name {
                                       case "cut": return (try? NetnsHosts.command(["cut", "h2"]))?.status == 0
                                       case "kill-host":
                                           let victims = NetnsHosts.processes(on: 2).filter { ["orted", "seqpar"].contains($0.name) }
                                           guard victims.count == 2 else { return false }
                                           return victims.allSatisfy { kill($0.pid, SIGKILL) == 0 }
                                       default:
                                           guard let rank = NetnsHosts.processes(on: 3).first(where: { $0.name == "seqpar" }) else { return false }
                                           return kill(rank.pid, SIGKILL) == 0
                                       }
                                   }))
        let faultAt = try #require(r.actionAt, "the fault was never injected: \(r.output)")
        #expect(!r.timedOut && r.status != 0, "\(r.output)")
        #expect(fault.messages.contains { r.output.contains($0) }, "expected one of \(fault.messages) in: \(r.output)")
        if fault.name != "cut" { #expect(r.output.contains(fault.name == "kill-rank" ? "on node \(NetnsHosts.prefix)-h3" : "on node \(NetnsHosts.prefix)-h2"), "\(r.output)") }
        #expect(r.seconds - faultAt < fault.bound, "the job ended \(r.seconds - faultAt) s after the fault")
        let left = NetnsHosts.leftovers()
        #expect(left.isEmpty, "processes left after the job ended: \(left)")
    }
}
