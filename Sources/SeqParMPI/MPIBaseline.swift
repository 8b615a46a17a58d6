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

    /// Send and receive buffers kept from call to call (grown when a larger size comes), as SeqPar's own benchmark
    /// reuses its buffers: no allocation, first touch or registration inside the timing. One thread per process.
    nonisolated(unsafe) static var buffers: (send: UnsafeMutableRawPointer, receive: UnsafeMutableRawPointer, sendBytes: Int, receiveBytes: Int)?

    static func timed(_ bytes: Int, receive: Int, _ body: (UnsafeMutableRawPointer, UnsafeMutableRawPointer) throws -> Void) throws -> Double {
        if buffers == nil || buffers!.sendBytes < bytes || buffers!.receiveBytes < receive {
            if let b = buffers { b.send.deallocate(); b.receive.deallocate() }
            let (s, r) = (max(bytes, 1), max(receive, 1))
            let send = UnsafeMutableRawPointer.allocate(byteCount: s, alignment: 64)
            let recv = UnsafeMutableRawPointer.allocate(byteCount: r, alignment: 64)
            send.initializeMemory(as: UInt8.self, repeating: 1, count: s)
            recv.initializeMemory(as: UInt8.self, repeating: 0, count: r)
            buffers = (send, recv, s, r)
        }
        let b = buffers!
        // Start together, as SeqPar's side does after its barrier.
        try check(MPI_Barrier(MPI_COMM_WORLD), "MPI_Barrier")
        let t = MPI_Wtime()
        try body(b.send, b.receive)
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
