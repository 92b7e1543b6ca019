LOCAL_PATH := $(call my-dir)
include $(CLEAR_VARS)
LOCAL_MODULE := edgeact_jni
LOCAL_SRC_FILES := edgeact_jni.c $(addprefix ../../native/,$(shell grep -v "^\#" $(LOCAL_PATH)/../../native/sources.txt))
LOCAL_C_INCLUDES := $(LOCAL_PATH)/../../native/include $(LOCAL_PATH)/../../native/src
LOCAL_CFLAGS := -O2 $(shell cat $(LOCAL_PATH)/../../native/cflags.txt)
LOCAL_LDLIBS := -lm
include $(BUILD_SHARED_LIBRARY)
