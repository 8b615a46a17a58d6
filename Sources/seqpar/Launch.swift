// Which backend runs the ranks: MPI when an MPI launcher started this process, otherwise the in-process cluster
// with --ranks N threads. Also where errors become exit codes: a collective error (every rank has it) exits 1 on
// every rank after finalising MPI; any other error on one rank aborts the whole MPI job, so nothing hangs.
import ArgumentParser
import Foundation
import SeqPar
import SeqParMPI

struct Backend: Sendable {
    var name: String
    var ranks: Int
    /// Ranks sharing this machine's memory and cores.
    var ranksPerHost: Int
}

enum Launch {
    static var underMPI: Bool { MPIEnvironment.launchedByMPI }

    /// Checks --ranks against the launcher; returns the number of ranks of the simulation (nil under MPI).
    static func simulatedRanks(_ requested: Int?) throws -> Int? {
        if underMPI {
            if let r = requested, r != 1 {
                throw SeqParError.invalidInput("--ranks \(r) asks for the simulation backend, but this process was started by mpirun: drop --ranks (mpirun -np P sets the ranks) or run without mpirun")
            }
            return nil
        }
        return requested ?? 1
    }

    /// Runs `body` on every rank; returns rank 0's result (nil on other MPI ranks). Errors are printed and turned
    /// into `ExitCode.failure`.
    static func run<R>(ranks requested: Int?, timeout: Double, threads: Int = 1,
                       _ body: @escaping @Sendable (any Communicator, Backend) throws -> R) throws -> R? {
        configureAllocator()
        SoftmaxAttention.threads = threads
        if let n = try simulatedRanks(requested) {
            configureBLAS(simulatedRanks: n)
            do {
                let results = try InProcessCluster.run(ranks: n, timeout: timeout) { comm in
                    try body(comm, Backend(name: "in-process", ranks: n, ranksPerHost: n))
                }
                return results[0]
            } catch {
                printError("\(error)")
                throw ExitCode.failure
            }
        }
        let env: MPIEnvironment
        do { env = try MPIEnvironment(timeout: timeout) } catch {
            printError("cannot start MPI: \(error)")
            throw ExitCode.failure
        }
        let comm = env.world
        configureBLAS(simulatedRanks: nil)
        do { try configureRingProgress() } catch {
            printError("\(error)")
            env.finalize()
            throw ExitCode.failure
        }
        let localRanks = Int(ProcessInfo.processInfo.environment["OMPI_COMM_WORLD_LOCAL_SIZE"] ?? "") ?? 1
        do {
            let result = try body(comm, Backend(name: "mpi", ranks: comm.size, ranksPerHost: localRanks))
            env.finalize()
            return comm.rank == 0 ? result : nil
        } catch {
            let collective = (error as? SeqParError)?.isCollective ?? false
            if collective {
                printError(comm.size > 1 ? "(rank \(comm.rank) of \(comm.size)) \(error)" : "\(error)")
                env.finalize()
                throw ExitCode.failure
            }
            comm.abort("\(error)")
            throw ExitCode.failure
        }
    }

    /// BLAS threads: one per simulated rank (N threads share the process); under MPI, the cores this rank may use
    /// divided among the ranks of its host, unless OPENBLAS_NUM_THREADS says otherwise.
    static func configureBLAS(simulatedRanks: Int?) {
        if ProcessInfo.processInfo.environment["OPENBLAS_NUM_THREADS"] != nil { return }
        if let n = simulatedRanks {
            if n > 1 { BLAS.threads = 1 }
            return
        }
        let (cpus, sharing) = cpusOfThisRank()
        BLAS.threads = max(1, cpus / sharing)
    }

    /// The CPUs this MPI rank may run on, and how many ranks share them: a rank bound to a few cores has them to
    /// itself; an unbound rank shares the host's cores with the other ranks of its host.
    static func cpusOfThisRank() -> (cpus: Int, sharing: Int) {
        let cpus = SystemInfo.allowedCPUs().count
        let local = max(Int(ProcessInfo.processInfo.environment["OMPI_COMM_WORLD_LOCAL_SIZE"] ?? "") ?? 1, 1)
        return (cpus, cpus < SystemInfo.onlineCPUs ? 1 : local)
    }
}

extension Launch {
    /// Keeps freed buffers of up to 32 MiB in the process for the next allocation (glibc's mallopt), unless
    /// $SEQPAR_MALLOC_DEFAULTS is set. By default glibc hands such buffers back to the kernel (munmap, or trimming the
    /// heap), and each ring pass, kernel call or step that allocates them again pays a page fault per 4 KiB page on
    /// first touch: on the device machine 2048 faults (8 MiB) cost 2-4 ms, as much as the ring exchange they precede.
    /// Larger buffers are still mapped afresh: their compute dwarfs the faults.
    static func configureAllocator() {
        #if canImport(Glibc)
        guard ProcessInfo.processInfo.environment["SEQPAR_MALLOC_DEFAULTS"] == nil else { return }
        let (trimThreshold, mmapThreshold): (Int32, Int32) = (-1, -3)  // M_TRIM_THRESHOLD, M_MMAP_THRESHOLD (malloc.h)
        _ = glibcMallopt(mmapThreshold, 32 << 20)
        _ = glibcMallopt(trimThreshold, 1 << 30)
        #endif
    }

    /// How ring exchanges progress during compute (`RingProgress`): $SEQPAR_RING_PROGRESS if set; otherwise a
    /// progress thread when this rank has a core its BLAS threads leave free (a rank bound to more cores than
    /// threads, or unbound ranks with cores to spare), else MPI_Test calls between tiles.
    static func configureRingProgress() throws {
        let env = ProcessInfo.processInfo.environment
        if let name = env["SEQPAR_RING_PROGRESS"] {
            guard let mode = RingProgress(rawValue: name) else {
                throw SeqParError.invalidInput("SEQPAR_RING_PROGRESS=\(name): give one of \(RingProgress.allCases.map(\.rawValue).joined(separator: ", ")), or unset it")
            }
            RingProgress.standard = mode
            return
        }
        let (cpus, sharing) = cpusOfThisRank()
        RingProgress.standard = cpus >= sharing * (BLAS.threads + 1) ? .thread : .tests
    }
}

#if canImport(Glibc)
/// glibc's mallopt (malloc.h, which the Glibc module does not bring in).
@_silgen_name("mallopt") private func glibcMallopt(_ parameter: Int32, _ value: Int32) -> Int32
#endif

func printError(_ text: String) {
    FileHandle.standardError.write(Data("seqpar: error: \(text)\n".utf8))
}

func printNote(_ text: String) {
    FileHandle.standardError.write(Data("seqpar: \(text)\n".utf8))
}

