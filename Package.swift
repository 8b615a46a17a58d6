// swift-tools-version:6.0
//
// SeqPar: sequence-parallel attention on MPI.
//   CMPI        system library over OpenMPI's mpi.h (a shim turns cast macros into getters)
//   COpenBLAS   system library over OpenBLAS's cblas.h
//   SeqPar      tensors, communicator protocol + in-process cluster, kernels, algorithms (no MPI)
//   SeqParMPI   MPICommunicator, the only module that imports CMPI
//   seqpar      the command-line tool
import PackageDescription

let package = Package(
    name: "SeqPar",
    products: [
        .executable(name: "seqpar", targets: ["seqpar"]),
        .library(name: "SeqPar", targets: ["SeqPar"]),
        .library(name: "SeqParMPI", targets: ["SeqParMPI"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/x-sheep/swift-property-based", from: "2.0.1"),
    ],
    targets: [
        .systemLibrary(
            name: "CMPI", path: "CMPI", pkgConfig: "ompi-c",
            providers: [.apt(["libopenmpi-dev"])]),
        .systemLibrary(
            name: "COpenBLAS", path: "Sources/COpenBLAS", pkgConfig: "openblas",
            providers: [.apt(["libopenblas-dev"])]),
        .target(name: "SeqPar", dependencies: ["COpenBLAS"]),
        .target(name: "SeqParMPI", dependencies: ["SeqPar", "CMPI"]),
        .executableTarget(
            name: "seqpar",
            dependencies: [
                "SeqPar", "SeqParMPI",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]),
        .testTarget(
            name: "SeqParTests",
            dependencies: [
                "SeqPar",
                .product(name: "PropertyBased", package: "swift-property-based"),
            ]),
        // Launches the built `seqpar` binary under a real `mpirun`; depends on the executable so that
        // `swift test` builds it first.
        .testTarget(name: "SeqParMPITests", dependencies: ["seqpar"]),
    ]
)
