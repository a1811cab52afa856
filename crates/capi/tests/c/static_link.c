// SPDX-License-Identifier: MIT OR Apache-2.0
// Links libnccl_ep.a (no shared library): the static archive resolves every symbol a caller
// of the header needs, and the calls behave as in the shared library.
#include <nccl_ep.h>

#include <stdio.h>
#include <string.h>

int main(void) {
    int version = -1;
    if (ncclEpGetVersion(&version) != ncclSuccess || version != NCCL_EP_VERSION_CODE) {
        fprintf(stderr, "static_link: ncclEpGetVersion gave %d\n", version);
        return 1;
    }
    // A bad call returns its code and leaves a message instead of aborting.
    if (ncclEpGetVersion(NULL) != ncclInvalidArgument || strlen(moeEpGetLastError()) == 0) {
        fprintf(stderr, "static_link: NULL out-pointer not refused\n");
        return 1;
    }
    ncclEpTensor_t* t = NULL;
    size_t dims[2] = {4, 8};
    if (ncclEpTensorAlloc(&t, 2, ncclBfloat16, dims, NULL) != ncclSuccess || t->sizes[1] != 8 ||
        ncclEpTensorDestroy(t) != ncclSuccess) {
        fprintf(stderr, "static_link: tensor descriptors: %s\n", moeEpGetLastError());
        return 1;
    }
    printf("static_link: ok\n");
    return 0;
}
