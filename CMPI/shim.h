// Why this shim exists: OpenMPI defines its handles as casts of global objects, e.g.
//   #define MPI_COMM_WORLD OMPI_PREDEFINED_GLOBAL(MPI_Comm, ompi_mpi_comm_world)
// Swift imports only simple constant macros, so MPI_COMM_WORLD, MPI_FLOAT, MPI_SUM, MPI_IN_PLACE ... do not exist
// in Swift. Each one is wrapped here in a static inline getter; `swift_name("getter:...")` makes it read as a
// global in Swift (`MPI_COMM_WORLD`), as in C. This file can shrink if Swift's ClangImporter ever learns to import
// cast macros. Only handles SeqParMPI uses are listed; add others the same way.
#ifndef SEQPAR_CMPI_SHIM_H
#define SEQPAR_CMPI_SHIM_H
#include <mpi.h>

#define SEQPAR_MPI_GETTER(type, name) \
    __attribute__((swift_name("getter:" #name "()"))) static inline type seqpar_get_##name(void) { return name; }

SEQPAR_MPI_GETTER(MPI_Comm, MPI_COMM_WORLD)
SEQPAR_MPI_GETTER(MPI_Comm, MPI_COMM_NULL)
SEQPAR_MPI_GETTER(MPI_Datatype, MPI_FLOAT)
SEQPAR_MPI_GETTER(MPI_Datatype, MPI_DOUBLE)
SEQPAR_MPI_GETTER(MPI_Datatype, MPI_INT32_T)
SEQPAR_MPI_GETTER(MPI_Datatype, MPI_INT64_T)
SEQPAR_MPI_GETTER(MPI_Datatype, MPI_UINT8_T)
SEQPAR_MPI_GETTER(MPI_Datatype, MPI_UINT16_T)
SEQPAR_MPI_GETTER(MPI_Datatype, MPI_UINT64_T)
SEQPAR_MPI_GETTER(MPI_Op, MPI_SUM)
SEQPAR_MPI_GETTER(MPI_Op, MPI_MAX)
SEQPAR_MPI_GETTER(MPI_Op, MPI_MIN)
SEQPAR_MPI_GETTER(MPI_Errhandler, MPI_ERRORS_RETURN)
SEQPAR_MPI_GETTER(MPI_Request, MPI_REQUEST_NULL)
SEQPAR_MPI_GETTER(void *, MPI_IN_PLACE)
SEQPAR_MPI_GETTER(MPI_Status *, MPI_STATUS_IGNORE)
SEQPAR_MPI_GETTER(MPI_Status *, MPI_STATUSES_IGNORE)

#endif
