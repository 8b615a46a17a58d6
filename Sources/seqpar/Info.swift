import ArgumentParser
import Foundation
import SeqPar
import SeqParMPI

struct Info: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "MPI library, ranks and hosts, core binding, BLAS kernel and threads, oneDNN (the bf16 path) and the instruction set it dispatches to, and a warning for each setting that will cost speed.")

    @OptionGroup var rankOptions: RankOptions

    func run() throws {
        let mpiVersion = Launch.underMPI ? MPIEnvironment.libraryVersion : nil
        let lines = try Launch.run(ranks: rankOptions.ranks, timeout: rankOptions.timeout) { comm, backend in
            try Info.describe(comm: comm, backend: backend, mpiVersion: mpiVersion)
        }
        if let lines { print(lines.joined(separator: "\n")) }
    }

    static func describe(comm: some Communicator, backend: Backend, mpiVersion: String?) throws -> [String] {
        let cpus = SystemInfo.allowedCPUs()
        // oneDNN as each rank sees it (hosts may differ): version, instruction set, bf16 unit.
        let dnn = OneDNN.isAvailable ? "\(OneDNN.version ?? "?")|\(OneDNN.isa ?? "?")|\(OneDNN.hasBF16Unit ? 1 : 0)" : "-|-|0"
        let mine = "\(SystemInfo.hostName)|\(SystemInfo.cpuList(cpus))|\(cpus.count)|\(SystemInfo.onlineCPUs)|\(BLAS.threads)|\(dnn)"
        let all = try comm.allGatherStrings(mine).map { $0.split(separator: "|", omittingEmptySubsequences: false).map(String.init) }
        guard comm.rank == 0 else { return [] }
        var lines = ["# seqpar info", "version: \(SeqParCommand.version)"]
        if let v = mpiVersion {
            lines.append("backend: MPI, \(v)")
        } else {
            lines.append("backend: in-process simulation (\(backend.ranks) rank(s) as threads of one process; not started by mpirun)")
        }
        var perHost: [String: [Int]] = [:]
        for (r, f) in all.enumerated() { perHost[f[0], default: []].append(r) }
        lines.append("ranks: \(comm.size) on \(perHost.count) host(s): " + perHost.keys.sorted().map { "\($0) (\(perHost[$0]!.count))" }.joined(separator: ", "))
        lines.append("rank  host              cpus_allowed      blas_threads")
        for (r, f) in all.enumerated() {
            lines.append(Report.pad("\(r)", 6) + Report.pad(String(f[0].prefix(17)), 18) + Report.pad(f[1], 18) + f[4])
        }
        lines.append("ring progress: \(RingProgress.standard.rawValue) (how ring exchanges move during compute; SEQPAR_RING_PROGRESS=tests|thread|none overrides)")
        let core = BLAS.coreName
        lines.append("blas: OpenBLAS, core type \(core), \(BLAS.threads) thread(s) on rank 0; \(BLAS.config)")
        if let t = ProcessInfo.processInfo.environment["OPENBLAS_CORETYPE"] { lines.append("blas: OPENBLAS_CORETYPE=\(t)") }
        if let v = OneDNN.version {
            let product = (try? OneDNN.context().implementation(m: SoftmaxAttention.tileRows, n: SoftmaxAttention.tileCols, k: 64)) ?? "?"
            lines.append("onednn: version \(v), isa \(OneDNN.isa ?? "?") on rank 0 (bf16 unit: \(OneDNN.hasBF16Unit ? "yes" : "no")); bf16 matmul of a \(SoftmaxAttention.tileRows)x\(SoftmaxAttention.tileCols)x64 tile: \(product)")
            let packed = (try? OneDNN.context().packedLayoutName(k: 128, n: SoftmaxAttention.tileCols)).flatMap { $0 }
            lines.append("onednn: K and V tiles " + (packed.map { "packed once per kv head into \($0) blocks\(ProcessInfo.processInfo.environment["SEQPAR_BF16_PACK"] == "off" ? " (off: SEQPAR_BF16_PACK=off)" : "")" } ?? "read plain (no packed layout here)"))
        } else {
            lines.append("onednn: not loaded on rank 0 (--precision bf16 needs it)")
        }

        var warnings: [String] = []
        for (host, ranks) in perHost.sorted(by: { $0.key < $1.key }) {
            let fields = ranks.map { all[$0] }
            let online = Int(fields[0][3]) ?? 1
            let threads = fields.map { Int($0[4]) ?? 1 }.reduce(0, +)
            if backend.name == "mpi" && ranks.count > online {
                warnings.append("\(host): \(ranks.count) ranks on \(online) cores: ranks will take turns; use fewer ranks per host")
            }
            if backend.name == "mpi" && threads > online {
                warnings.append("\(host): \(ranks.count) rank(s) x BLAS threads = \(threads) threads on \(online) cores: set OPENBLAS_NUM_THREADS=\(max(1, online / ranks.count))")
            }
            if fields.contains(where: { $0.count > 7 && $0[5] == "-" }) {
                warnings.append("\(host): oneDNN (libdnnl.so.2) cannot be loaded: --precision bf16 fails there; install it with `apt-get install libdnnl2` (or libdnnl-dev; launch/install-deps does)")
            } else if let f = fields.first(where: { $0.count > 7 && $0[7] == "0" }) {
                warnings.append("\(host): oneDNN dispatches to \(f[6]), which has no bf16 unit (AVX512-BF16 or AMX): --precision bf16 is emulated there, slower than fp32")
            }
            let unbound = fields.filter { (Int($0[2]) ?? 0) >= online }.count
            if backend.name == "mpi" && ranks.count > 1 && unbound == ranks.count {
                warnings.append("\(host): ranks are not bound to cores (each may run on all \(online)): add --bind-to core to mpirun so ranks and their caches stay put")
            }
        }
        if let hint = slowBLASHint(core) { warnings.append(hint) }
        if backend.name == "in-process" && backend.ranks > 1 {
            warnings.append("simulation: \(backend.ranks) ranks share one process and BLAS runs one thread per rank; timings here are not MPI timings")
        }
        lines.append(warnings.isEmpty ? "warnings: none" : "warnings:")
        lines += warnings.map { "  - " + $0 }
        return lines
    }

    /// OpenBLAS falls back to old kernels when it does not recognise a CPU; say which core type to name instead.
    static func slowBLASHint(_ core: String) -> String? {
        let flags = (try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8))?
            .split(separator: "\n").first { $0.hasPrefix("flags") }.map { Set($0.split(separator: " ").map(String.init)) } ?? []
        let c = core.lowercased()
        if flags.contains("avx512f") && !["skylakex", "cooperlake", "sapphirerapids"].contains(c) {
            return "OpenBLAS chose core type \(core), but this CPU has AVX-512: set OPENBLAS_CORETYPE=SkylakeX (or Cooperlake) for its fast kernels"
        }
        if flags.contains("avx2") && !["haswell", "zen", "skylakex", "cooperlake", "sapphirerapids"].contains(c) {
            return "OpenBLAS chose core type \(core), but this CPU has AVX2: set OPENBLAS_CORETYPE=Haswell for its fast kernels"
        }
        return nil
    }
}
