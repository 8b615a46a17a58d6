// Fault injection, for testing only: makes one rank hang or die at a chosen point, so the tests can show that the
// other ranks stop (the watchdog, mpirun's own handling of a lost process) instead of hanging.
//
//   SEQPAR_FAULT=stall:rank=R[:after=N]   rank R stops before its communication call N+1 and never returns
//   SEQPAR_FAULT=kill:rank=R[:after=N]    rank R sends itself SIGKILL there (a crash nothing can catch)
//
// R is a world rank. Calls are counted on rank R as it makes them (sends, receives, collectives, barriers, splits; not
// waits or tests), in one count over the world communicator and every sub-communicator split from it; `after`
// defaults to 0 (before the first call). The variable is read only under MPI and has no other effect.
import Foundation
import SeqPar

struct FaultInjection: Sendable {
    enum Kind: String, Sendable { case stall, kill }
    let kind: Kind
    let rank: Int
    let after: Int

    /// Reads SEQPAR_FAULT; nil when unset. A spec that does not parse is an error (a test that meant to inject a
    /// fault must not pass because it was ignored).
    static func fromEnvironment() throws -> FaultInjection? {
        guard let spec = ProcessInfo.processInfo.environment["SEQPAR_FAULT"], !spec.isEmpty else { return nil }
        let parts = spec.split(separator: ":").map(String.init)
        var fields: [String: Int] = [:]
        for p in parts.dropFirst() {
            let kv = p.split(separator: "=", maxSplits: 1).map(String.init)
            guard kv.count == 2, ["rank", "after"].contains(kv[0]), let n = Int(kv[1]), n >= 0 else { return try bad(spec) }
            fields[kv[0]] = n
        }
        guard let kind = parts.first.flatMap(Kind.init(rawValue:)), let rank = fields["rank"] else { return try bad(spec) }
        return FaultInjection(kind: kind, rank: rank, after: fields["after"] ?? 0)
    }

    private static func bad(_ spec: String) throws -> FaultInjection? {
        throw SeqParError.invalidInput("SEQPAR_FAULT=\(spec): give stall:rank=R[:after=N] or kill:rank=R[:after=N] (testing only), or unset it")
    }

    /// Called by `rank` before its communication call number `call` (from 1), `routine`.
    func before(call: Int, routine: StaticString, rank: Int) {
        guard rank == self.rank, call == after + 1 else { return }
        FileHandle.standardError.write(Data("seqpar: rank \(rank): SEQPAR_FAULT: \(kind == .stall ? "stalling" : "killing this process") before communication call \(call) (\(routine)) (fault injection, for testing)\n".utf8))
        switch kind {
        case .stall: while true { Thread.sleep(forTimeInterval: 3600) }
        case .kill:
            kill(getpid(), SIGKILL)
            while true { Thread.sleep(forTimeInterval: 1) }
        }
    }
}
