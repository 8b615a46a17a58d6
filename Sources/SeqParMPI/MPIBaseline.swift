// Plain MPI for `seqpar bench comm`'s baseline: the same exchanges as SeqPar's, written directly against MPI on
// MPI_COMM_WORLD with no layer of ours between (no counters, no checks), as the OSU micro-benchmarks do.
import CMPI
import SeqPar

public enum MPIBaseline {
    /// Each closure runs `iterations` calls and returns this rank's seconds.
    public static func make() -> CommBaseline {
        CommBaseline(pingPong: pingPong, ring: ring, allGather: allGather, allToAll: allToAll)
    }

    static func rankAndSize() -> (Int32, Int32) {
        var rank: Int32 = 0, size: Int32 = 0
        MPI_Comm_rank(MPI_COMM_WORLD, &rank)
        MPI_Comm_size(MPI_COMM_WORLD, &size)
        return (rank, size)
    }

    static func timed(_ bytes: Int, receive: Int, _ body: (UnsafeMutableRawPointer, UnsafeMutableRawPointer) throws -> Void) throws -> Double {
        let send = UnsafeMutableRawPointer.allocate(byteCount: max(bytes, 1), alignment: 64)
        let recv = UnsafeMutableRawPointer.allocate(byteCount: max(receive, 1), alignment: 64)
        send.initializeMemory(as: UInt8.self, repeating: 1, count: max(bytes, 1))
        recv.initializeMemory(as: UInt8.self, repeating: 0, count: max(receive, 1))
        defer { send.deallocate(); recv.deallocate() }
        let t = MPI_Wtime()
        try body(send, recv)
        return MPI_Wtime() - t
    }

    static func pingPong(_ bytes: Int, _ iterations: Int) throws -> Double {
        let (rank, _) = rankAndSize()
        let n = try int32(bytes, "MPI_Send")
        return try timed(bytes, receive: bytes) { s, r in
            for _ in 0..<iterations {
                if rank == 0 {
                    try check(MPI_Send(s, n, MPI_UINT8_T, 1, 911, MPI_COMM_WORLD), "MPI_Send")
                    try check(MPI_Recv(r, n, MPI_UINT8_T, 1, 912, MPI_COMM_WORLD, MPI_STATUS_IGNORE), "MPI_Recv")
                } else if rank == 1 {
                    try check(MPI_Recv(r, n, MPI_UINT8_T, 0, 911, MPI_COMM_WORLD, MPI_STATUS_IGNORE), "MPI_Recv")
                    try check(MPI_Send(s, n, MPI_UINT8_T, 0, 912, MPI_COMM_WORLD), "MPI_Send")
                }
            }
        }
    }

    static func ring(_ bytes: Int, _ iterations: Int) throws -> Double {
        let (rank, size) = rankAndSize()
        let n = try int32(bytes, "MPI_Sendrecv")
        return try timed(bytes, receive: bytes) { s, r in
            for _ in 0..<iterations {
                try check(MPI_Sendrecv(s, n, MPI_UINT8_T, (rank + 1) % size, 913, r, n, MPI_UINT8_T, (rank - 1 + size) % size, 913,
                                       MPI_COMM_WORLD, MPI_STATUS_IGNORE), "MPI_Sendrecv")
            }
        }
    }

    static func allGather(_ bytes: Int, _ iterations: Int) throws -> Double {
        let (_, size) = rankAndSize()
        let n = try int32(bytes, "MPI_Allgather")
        return try timed(bytes, receive: bytes * Int(size)) { s, r in
            for _ in 0..<iterations { try check(MPI_Allgather(s, n, MPI_UINT8_T, r, n, MPI_UINT8_T, MPI_COMM_WORLD), "MPI_Allgather") }
        }
    }

    static func allToAll(_ bytes: Int, _ iterations: Int) throws -> Double {
        let (_, size) = rankAndSize()
        let n = try int32(bytes / Int(size), "MPI_Alltoall")
        return try timed(bytes, receive: bytes) { s, r in
            for _ in 0..<iterations { try check(MPI_Alltoall(s, n, MPI_UINT8_T, r, n, MPI_UINT8_T, MPI_COMM_WORLD), "MPI_Alltoall") }
        }
    }
}
