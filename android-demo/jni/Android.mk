LOCAL_PATH := $(call my-dir)
include $(CLEAR_VARS)
LOCAL_MODULE := edgeact_jni
LOCAL_SRC_FILES := edgeact_jni.c $(wildcard $(LOCAL_PATH)/../../native/src/*.c) $(wildcard $(LOCAL_PATH)/../../native/src/kernels/*.c)
LOCAL_C_INCLUDES := $(LOCAL_PATH)/../../native/include $(LOCAL_PATH)/../../native/src
LOCAL_CFLAGS := -std=c11 -O2 -Wall
LOCAL_LDLIBS := -lm
include $(BUILD_SHARED_LIBRARY)
