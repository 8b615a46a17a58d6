import ArgumentParser
import Foundation
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

/// Kernel threads per rank (`seqpar attention`, `demo`, `bench attention`, `bench documents`).
struct ThreadOptions: ParsableArguments {
    @Option(help: ArgumentHelp("Kernel threads per rank: the bf16 softmax kernels hand their work (query tiles forward, kv heads backward) to this many threads as they free up. Give each rank as many cores (mpirun --map-by slot:PE=N --bind-to core). fp32 products thread through OpenBLAS instead (OPENBLAS_NUM_THREADS).", valueName: "n"))
    var threads: Int = 1

    func validate() throws {
        if !(1...256).contains(threads) { throw ValidationError("--threads \(threads): give between 1 and 256 threads per rank") }
    }
}

/// Packed documents (`seqpar attention`, `demo`, `bench attention`): one sequence holding several documents back to
/// back; attention never crosses a boundary, and linear attention restarts its state at each document start.
struct DocumentOptions: ParsableArguments {
    @Option(help: ArgumentHelp("Packed documents: their lengths, comma-separated, summing to the sequence length (e.g. 301,7,450). Attention never crosses a document; causal within it with --causal.",
                               valueName: "n[,n...]"))
    var docLens: String?

    @Option(help: ArgumentHelp("Packed documents as flash-attn's cu_seqlens: a one-dimensional int32 or int64 .npy file of offsets 0, ..., L.",
                               valueName: "file.npy"))
    var cuSeqlens: String?

    var given: Bool { docLens != nil || cuSeqlens != nil }

    func validate() throws {
        if docLens != nil && cuSeqlens != nil {
            throw ValidationError("--doc-lens and --cu-seqlens both give the documents: give one")
        }
        _ = try lengths()
        if let path = cuSeqlens, !FileManager.default.fileExists(atPath: path) { throw ValidationError("--cu-seqlens \(path): no such file") }
    }

    /// The documents given, checked against the sequence length (nil when neither option is).
    func documents(seqLen: Int) throws -> Documents? {
        if let lengths = try lengths() { return try Documents(lengths: lengths, seqLen: seqLen) }
        if let path = cuSeqlens { return try Documents(cuSeqlens: NPY.readIntegers(path), seqLen: seqLen, source: "--cu-seqlens \(path)") }
        return nil
    }

    /// The sequence length the documents give (their sum, or the last offset), for runs that are not told one.
    func impliedSeqLen() throws -> Int? {
        if let lengths = try lengths() { return lengths.reduce(0, +) }
        return try cuSeqlens.map { try NPY.readIntegers($0).last ?? 0 }
    }

    /// The lengths of --doc-lens (whether they sum to the sequence length is the run's check, which knows it).
    func lengths() throws -> [Int]? {
        guard let text = docLens else { return nil }
        let values = text.split(separator: ",", omittingEmptySubsequences: false).map { Int($0.trimmingCharacters(in: .whitespaces)) }
        guard values.allSatisfy({ $0 != nil }) else {
            throw ValidationError("--doc-lens '\(text)': give the documents' lengths as whole numbers separated by commas, summing to the sequence length (e.g. --doc-lens 301,7,450)")
        }
        return values.map { $0! }
    }
}
