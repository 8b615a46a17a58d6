import ArgumentParser
import SeqPar

struct SelfTest: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "selftest",
        abstract: "Exercise every communication operation on this launch (mpirun or --ranks) and check the results.",
        discussion: "Use it to check an MPI installation or a new cluster before a long run. Exit 0 when every check passes.")

    @OptionGroup var rankOptions: RankOptions

    func run() throws {
        let result = try Launch.run(ranks: rankOptions.ranks, timeout: rankOptions.timeout) { comm, backend in
            (try CommunicatorChecks.run(comm), backend)
        }
        if let (checks, backend) = result {
            print("selftest: \(checks.count) communication checks passed on \(backend.ranks) rank(s), backend \(backend.name): \(checks.joined(separator: ", "))")
        }
    }
}
