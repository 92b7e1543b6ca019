/* JNI face of the runtime for ai.edgeact.demo.EdgeAct: load a model folder
 * (pushed to the app's files dir), run token ids, get logits. Errors become
 * java.lang.IllegalStateException with the runtime's one-line message. */
#include <jni.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "edgeact.h"

typedef struct { ea_model *model; ea_session *session; int vocab; } handle;

static void throw_state(JNIEnv *env, const char *what) {
    jclass cls = (*env)->FindClass(env, "java/lang/IllegalStateException");
    char msg[512];
    snprintf(msg, sizeof msg, "%s: %s", what, ea_last_error());
    (*env)->ThrowNew(env, cls, msg);
}

JNIEXPORT jlong JNICALL Java_ai_edgeact_demo_EdgeAct_nativeOpen(JNIEnv *env, jclass cls, jstring dir, jint threads) {
    (void)cls;
    const char *path = (*env)->GetStringUTFChars(env, dir, NULL);
    handle *h = calloc(1, sizeof *h);
    int rc = h ? ea_model_load(path, &h->model) : -1;
    (*env)->ReleaseStringUTFChars(env, dir, path);
    if (rc) { free(h); throw_state(env, "load"); return 0; }
    ea_model_info info;
    ea_model_get_info(h->model, &info);
    h->vocab = info.vocab;
    if (ea_session_create(h->model, threads, 0, 0, &h->session)) {
        ea_model_free(h->model); free(h); throw_state(env, "session"); return 0;
    }
    return (jlong)(intptr_t)h;
}

/* Appends ids to the KV cache; returns the logits of the last one. */
JNIEXPORT jfloatArray JNICALL Java_ai_edgeact_demo_EdgeAct_nativeForward(JNIEnv *env, jclass cls, jlong ptr,
                                                                         jlongArray ids) {
    (void)cls;
    handle *h = (handle *)(intptr_t)ptr;
    if (!h) { throw_state(env, "forward on a closed model"); return NULL; }
    jsize n = (*env)->GetArrayLength(env, ids);
    jlong *raw = (*env)->GetLongArrayElements(env, ids, NULL);
    float *logits = malloc(sizeof(float) * (size_t)h->vocab);
    int rc = logits ? ea_session_forward(h->session, (const int64_t *)raw, (int)n, logits, 0) : -1;
    (*env)->ReleaseLongArrayElements(env, ids, raw, JNI_ABORT);
    if (rc) { free(logits); throw_state(env, "forward"); return NULL; }
    jfloatArray out = (*env)->NewFloatArray(env, h->vocab);
    (*env)->SetFloatArrayRegion(env, out, 0, h->vocab, logits);
    free(logits);
    return out;
}

JNIEXPORT void JNICALL Java_ai_edgeact_demo_EdgeAct_nativeReset(JNIEnv *env, jclass cls, jlong ptr) {
    (void)env; (void)cls;
    handle *h = (handle *)(intptr_t)ptr;
    if (h) ea_session_reset(h->session);
}

JNIEXPORT void JNICALL Java_ai_edgeact_demo_EdgeAct_nativeClose(JNIEnv *env, jclass cls, jlong ptr) {
    (void)env; (void)cls;
    handle *h = (handle *)(intptr_t)ptr;
    if (!h) return;
    ea_session_free(h->session);
    ea_model_free(h->model);
    free(h);
}
