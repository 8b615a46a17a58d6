import ArgumentParser
import SeqPar

@main
struct SeqParCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "seqpar",
        abstract: "Sequence-parallel attention across MPI ranks, checked against dense attention.",
        discussion: """
        Under `mpirun -np P seqpar ...` every rank is an MPI process. Without an MPI launcher, `--ranks N` runs N \
        simulated ranks as threads of one process (the same algorithms, communicating through memory).
        """,
        version: SeqParCommand.version,
        subcommands: [Demo.self, Attention.self, DecodeCommand.self, Bench.self, ReportCommand.self, ModelCommand.self, Info.self, SelfTest.self])
}

extension SeqParCommand {
    /// What `seqpar --version` prints: the version and the commit the binary was built from (Plugins/BuildInfo).
    static let version = "seqpar \(SeqParVersion.number) (commit \(BuildInfo.commit))"
}

/// Options shared by every subcommand that runs ranks.
struct RankOptions: ParsableArguments {
    @Option(help: "Simulated ranks in one process (without mpirun). Default 1; the demo's default is 4.")
    var ranks: Int?

    @Option(help: "Seconds a rank may wait for another in one communication before the job stops with an error.")
    var timeout: Double = 300

    func validate() throws {
        if let r = ranks, !(1...1024).contains(r) {
            throw ValidationError("--ranks \(r): give between 1 and 1024 simulated ranks")
        }
        guard timeout > 0, timeout.isFinite else { throw ValidationError("--timeout must be a positive number of seconds") }
    }
}
